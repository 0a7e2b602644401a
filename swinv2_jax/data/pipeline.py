"""grain input pipelines: infinite, per-process, checkpointable train streams and padded eval.

Train stream of one process: its shard of the split (records process_index::process_count) ->
shuffle -> repeat forever (grain reseeds the shuffle every epoch) -> per-example augmentation with
grain's per-index RNG -> batch. Every batch is therefore a pure function of (seed, process, step),
and the iterator state is just a position, so a restored iterator continues exactly.
"""

import math

from absl import flags
import grain
import numpy as np
from PIL import Image

from swinv2_jax.data import transforms
from swinv2_jax.data.config import validate_data_config
from swinv2_jax.data.randaugment import RandAugment
from swinv2_jax.data.sources import open_split


def _size_hw(image_size):
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _per_process_batch(global_batch_size, process_count):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  return global_batch_size // process_count


def _derived_seed(*parts) -> int:
  # Independent 32-bit seeds per (purpose, seed, process), so processes do not share crops.
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _crop_and_flip(element, rng: np.random.Generator, t) -> Image.Image:
  """RandomResizedCrop then an optional horizontal flip: the start of both train transforms."""
  img = transforms.to_rgb_pil(element["image"])
  img = transforms.random_resized_crop(rng, img, t.size_hw, t.scale, t.ratio, t.interpolation)
  if t.hflip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return img


class SupervisedTrainTransform(grain.transforms.RandomMap):
  """timm/official train recipe: RRC -> hflip -> RandAugment -> normalise -> random erasing."""

  def __init__(self, cfg, size_hw):
    self.size_hw = size_hw
    self.scale, self.ratio = tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio)
    self.interpolation, self.hflip, self.reprob = cfg.interpolation, cfg.hflip, cfg.reprob
    self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
    fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
    self.randaugment = (RandAugment.from_string(
        cfg.randaugment, fill=fill, resample=transforms.PIL_RESAMPLE[cfg.interpolation])
                        if cfg.randaugment else None)

  def random_map(self, element, rng: np.random.Generator):
    img = _crop_and_flip(element, rng, self)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    x = transforms.random_erase(rng, transforms.normalize(img, self.mean, self.std), self.reprob)
    return {"image": x, "label": np.int32(element["label"])}


class SimMIMTrainTransform(grain.transforms.RandomMap):
  """data_simmim_pt.py: RRC(scale 0.67..1) -> hflip -> normalise, plus the SimMIM token mask."""

  def __init__(self, cfg, size_hw, mask_cfg):
    self.size_hw = size_hw
    self.scale, self.ratio = tuple(cfg.simmim_rrc_scale), tuple(cfg.rrc_ratio)
    self.interpolation, self.hflip = cfg.simmim_interpolation, cfg.hflip
    self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
    self.mask_patch_size = int(mask_cfg["mask_patch_size"])
    self.model_patch_size = int(mask_cfg["model_patch_size"])
    self.mask_ratio = float(mask_cfg["mask_ratio"])
    transforms.check_mask_config(*size_hw, self.mask_patch_size, self.model_patch_size,
                                 self.mask_ratio)

  def random_map(self, element, rng: np.random.Generator):
    img = _crop_and_flip(element, rng, self)
    mask = transforms.simmim_mask(rng, self.size_hw, self.mask_patch_size, self.model_patch_size,
                                  self.mask_ratio)
    return {"image": transforms.normalize(img, self.mean, self.std), "mask": mask}


def _to_iter(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  if cfg.num_workers == 0:
    # Threads of this process compute `prefetch` batches ahead (PIL releases the GIL when resizing).
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.prefetch, prefetch_buffer_size=cfg.prefetch))
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) use defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
      grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                   per_worker_buffer_size=cfg.prefetch))


def build_train_dataset(data_cfg, *, kind: str, image_size, global_batch_size: int, seed: int,
                        mask_cfg=None, process_index=None, process_count=None) -> grain.IterDataset:
  """The infinite batched train stream of this process as a grain IterDataset (see module doc)."""
  validate_data_config(data_cfg)
  size_hw = _size_hw(image_size)
  process_index, process_count = _process(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, process_count)
  if kind == "supervised":
    transform = SupervisedTrainTransform(data_cfg, size_hw)
  elif kind == "simmim":
    if mask_cfg is None:
      raise ValueError('mask_cfg: needed for kind="simmim" '
                       "(mask_patch_size, model_patch_size, mask_ratio)")
    transform = SimMIMTrainTransform(data_cfg, size_hw, mask_cfg)
  else:
    raise ValueError(f'kind: must be "supervised" or "simmim", got {kind!r}')
  records, _ = open_split(data_cfg, "train")
  shard = grain.MapDataset.source(records)[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(
        f"data.train_split: {len(records)} examples cannot feed {process_count} processes")
  shuffle_seed = seed if data_cfg.shuffle_seed is None else data_cfg.shuffle_seed
  ds = shard.shuffle(seed=_derived_seed(1, shuffle_seed, process_index)).repeat()
  ds = ds.random_map(transform, seed=_derived_seed(2, seed, process_index))
  ds = ds.batch(batch_size, drop_remainder=True)
  return _to_iter(ds, data_cfg)


def build_train_iterator(data_cfg, *, kind: str, image_size, global_batch_size: int, seed: int,
                         mask_cfg=None, process_index=None,
                         process_count=None) -> grain.DatasetIterator:
  """Infinite iterator of this process's batches; `get_state()` is a JSON-serialisable dict.

  supervised: {'image': float32 [b, H, W, 3], 'label': int32 [b]}
  simmim:     {'image': float32 [b, H, W, 3], 'mask': int32 [b, H/model_patch, W/model_patch]}
  with b = global_batch_size // process_count. process_index/process_count default to jax's.
  """
  return iter(build_train_dataset(
      data_cfg, kind=kind, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      mask_cfg=mask_cfg, process_index=process_index, process_count=process_count))


class _EvalShard:
  """This process's eval records (index process_index::process_count), padded to `length`."""

  def __init__(self, records, process_index, process_count, length):
    self.records, self.start, self.step, self.length = records, process_index, process_count, length
    self.num_real = len(range(process_index, len(records), process_count))

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    if index < self.num_real:
      example = self.records[self.start + index * self.step]
      return {"image": example["image"], "label": example["label"], "valid": True}
    return {"image": None, "label": 0, "valid": False}


class EvalTransform(grain.transforms.Map):
  """Official eval (TEST.CROP): resize to int(size / eval_crop_ratio), center crop, normalise."""

  def __init__(self, cfg, size_hw):
    self.size_hw, self.crop_ratio = size_hw, cfg.eval_crop_ratio
    self.interpolation = cfg.interpolation
    self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)

  def map(self, element):
    if not element["valid"]:
      image = np.zeros((*self.size_hw, 3), np.float32)
    else:
      img = transforms.resize_center_crop(
          transforms.to_rgb_pil(element["image"]), self.size_hw, self.crop_ratio,
          self.interpolation)
      image = transforms.normalize(img, self.mean, self.std)
    return {"image": image, "label": np.int32(element["label"]),
            "valid": np.bool_(element["valid"])}


class EvalIterable:
  """Finite, re-iterable eval batches of this process: every process yields `len(self)` batches."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int, num_examples: int):
    self._dataset, self.num_batches, self.num_examples = dataset, num_batches, num_examples

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    return iter(self._dataset)


def build_eval_iterator(data_cfg, *, image_size, global_batch_size: int,
                        process_index=None, process_count=None) -> EvalIterable:
  """Batches {'image', 'label', 'valid'}; padding (valid=False) fills the last batches.

  Process p evaluates examples p, p + P, p + 2P, ...; all processes yield the same number of
  batches (a multi-host eval step must not hang), so every example appears once with valid=True.
  """
  validate_data_config(data_cfg)
  size_hw = _size_hw(image_size)
  process_index, process_count = _process(process_index, process_count)
  batch_size = _per_process_batch(global_batch_size, process_count)
  records, _ = open_split(data_cfg, "eval")
  num_batches = math.ceil(math.ceil(len(records) / process_count) / batch_size)
  shard = _EvalShard(records, process_index, process_count, num_batches * batch_size)
  ds = grain.MapDataset.source(shard).map(EvalTransform(data_cfg, size_hw)).batch(batch_size)
  return EvalIterable(_to_iter(ds, data_cfg), num_batches, len(records))
