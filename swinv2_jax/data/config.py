"""Data and augmentation config: every key, its default, and validation that names the bad key."""

import math

import ml_collections
from ml_collections import config_dict

from swinv2_jax.data.randaugment import RandAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_data_config(name: str = "imagenet2012") -> ml_collections.ConfigDict:
  """Defaults of the official SwinV2 fine-tune recipe (timm augmentation), tuned per data set.

  `default_data_config('digits')` turns off what does not suit 8x8 digits: mirrored digits change
  meaning (no hflip) and a 0.08 crop of 64 pixels is a few pixels (rrc_scale starts at 0.35).
  """
  c = ml_collections.ConfigDict()
  c.name = name  # a tfds name ('digits', 'imagenet2012', 'name/config:1.0.0') or 'folder'
  c.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.manual_dir = config_dict.placeholder(str)  # manual archives (named in the prepare command)
  # name='folder': root/<split>/<class>/<image>, or root/<class>/<image> with an eval fraction
  c.folder = config_dict.placeholder(str)
  c.folder_eval_fraction = 0.0  # > 0: root holds class folders; this fraction per class is eval
  c.image_key = "image"
  c.label_key = "label"
  c.train_split = "train"
  # None: 'validation' if the data set has it, else 'test'
  c.eval_split = config_dict.placeholder(str)
  c.num_workers = 0  # grain worker processes; 0 reads in this process (with threads)
  c.num_threads = 0  # decoding threads of the in-process reader; 0: one per CPU core
  c.prefetch = 2  # batches buffered per worker (or by the in-process reader)
  c.shuffle_seed = config_dict.placeholder(int)  # None: the iterator's `seed` sets the order too
  # Augmentation (timm create_transform, as in the official Swin build_transform).
  c.randaugment = "rand-m9-mstd0.5-inc1"  # '' = none
  c.hflip = True
  c.reprob = 0.25  # random erasing, mode 'pixel', one box
  c.rrc_scale = (0.08, 1.0)
  c.rrc_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.simmim_rrc_scale = (0.67, 1.0)  # SimMIM pretraining crop (data_simmim_pt.py)
  c.interpolation = "bicubic"
  c.simmim_interpolation = "bilinear"  # data_simmim_pt.py keeps torchvision's default
  c.eval_crop_ratio = 0.875  # resize shorter side to int(size / ratio), then center crop
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  # Mixup / CutMix on device (swinv2_jax.data.mixup); both alphas 0 = label smoothing only.
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.1
  if name == "digits":
    c.hflip = False
    c.rrc_scale = (0.35, 1.0)
    c.eval_split = "test"
  elif is_folder(c):
    c.eval_split = "val"
  return c


FOLDER = "folder"


def is_folder(cfg) -> bool:
  """An image-folder data set: data.name 'folder' (root in data.folder) or 'folder:/root'."""
  return cfg.name == FOLDER or str(cfg.name).startswith(FOLDER + ":")


def folder_root(cfg) -> str | None:
  """The image root of a folder data set: data.folder, else what follows 'folder:'."""
  return cfg.folder or (cfg.name[len(FOLDER) + 1:] if cfg.name != FOLDER else None) or None


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


def _fail(key, msg):
  raise ValueError(f"data.{key}: {msg}")


def _is_pair(v):
  return _is_floats(v, 2)


def _is_floats(v, n):
  return (isinstance(v, (tuple, list)) and len(v) == n
          and all(isinstance(x, (int, float)) for x in v))


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError('data.<key>: <what is wrong>') for the first bad or unknown key."""
  known = default_data_config(cfg.get("name", "imagenet2012"))
  for key in cfg.keys():
    if key not in known:
      _fail(key, f'unknown key (known: {", ".join(sorted(known.keys()))})')
  for key in known.keys():
    if key not in cfg:
      _fail(key, "missing (start from default_data_config())")
  if not isinstance(cfg.name, str) or not cfg.name:
    _fail("name", f'must be a tfds data set name or "folder", got {cfg.name!r}')
  if is_folder(cfg) and not folder_root(cfg):
    _fail("folder", 'must name the image root when data.name is "folder" (or use '
          'data.name="folder:/path/to/root")')
  if cfg.name.startswith(FOLDER + ":") and cfg.folder and cfg.folder != cfg.name[len(FOLDER) + 1:]:
    _fail("folder", f"{cfg.folder!r} and data.name={cfg.name!r} name two roots; give one")
  if cfg.name == "digits" and cfg.hflip:
    _fail("hflip", "must be False for digits (a mirrored digit is not the same digit)")
  if not 0.0 <= cfg.folder_eval_fraction < 1.0:
    _fail("folder_eval_fraction", f"must be in [0, 1), got {cfg.folder_eval_fraction}")
  if not isinstance(cfg.train_split, str) or not cfg.train_split:
    _fail("train_split", f"must be a non-empty split name, got {cfg.train_split!r}")
  if cfg.eval_split is not None and (not isinstance(cfg.eval_split, str) or not cfg.eval_split):
    _fail("eval_split", f"must be a split name or None, got {cfg.eval_split!r}")
  if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
    _fail("num_workers", f"must be an int >= 0, got {cfg.num_workers!r}")
  if not isinstance(cfg.num_threads, int) or cfg.num_threads < 0:
    _fail("num_threads", f"must be an int >= 0 (0: one per CPU core), got {cfg.num_threads!r}")
  if not isinstance(cfg.prefetch, int) or cfg.prefetch < 1:
    _fail("prefetch", f"must be an int >= 1, got {cfg.prefetch!r}")
  if cfg.shuffle_seed is not None and not isinstance(cfg.shuffle_seed, int):
    _fail("shuffle_seed", f"must be an int or None, got {cfg.shuffle_seed!r}")
  if not isinstance(cfg.randaugment, str):
    _fail("randaugment",
          f'must be "" or a timm string like "rand-m9-mstd0.5-inc1", got {cfg.randaugment!r}')
  if cfg.randaugment:
    RandAugment.from_string(cfg.randaugment)  # raises 'data.randaugment: ...'
  if not isinstance(cfg.hflip, bool):
    _fail("hflip", f"must be a bool, got {cfg.hflip!r}")
  if not 0.0 <= cfg.reprob <= 1.0:
    _fail("reprob", f"must be a probability in [0, 1], got {cfg.reprob}")
  for key in ("rrc_scale", "simmim_rrc_scale"):
    v = cfg[key]
    if not _is_pair(v) or not 0.0 < v[0] <= v[1] <= 1.0:
      _fail(key, f"must be (lo, hi) with 0 < lo <= hi <= 1, got {v!r}")
  if not _is_pair(cfg.rrc_ratio) or not 0.0 < cfg.rrc_ratio[0] <= cfg.rrc_ratio[1]:
    _fail("rrc_ratio", f"must be (lo, hi) with 0 < lo <= hi, got {cfg.rrc_ratio!r}")
  for key in ("interpolation", "simmim_interpolation"):
    if cfg[key] not in INTERPOLATIONS:
      _fail(key, f"must be one of {INTERPOLATIONS}, got {cfg[key]!r}")
  if not 0.0 < cfg.eval_crop_ratio <= 1.0:
    _fail("eval_crop_ratio", f"must be in (0, 1], got {cfg.eval_crop_ratio}")
  for key in ("mean", "std"):
    v = cfg[key]
    if not _is_floats(v, 3):
      _fail(key, f"must be 3 floats (RGB, images scaled to [0, 1]), got {v!r}")
  if min(cfg.std) <= 0:
    _fail("std", f"must be positive, got {cfg.std!r}")
  for key in ("mixup_alpha", "cutmix_alpha"):
    if not (cfg[key] >= 0.0 and math.isfinite(cfg[key])):
      _fail(key, f"must be a finite float >= 0, got {cfg[key]}")
  for key in ("mixup_prob", "mixup_switch_prob"):
    if not 0.0 <= cfg[key] <= 1.0:
      _fail(key, f"must be a probability in [0, 1], got {cfg[key]}")
  if not 0.0 <= cfg.label_smoothing < 1.0:
    _fail("label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing}")
