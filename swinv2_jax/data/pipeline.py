"""grain input pipelines: infinite, process-count-independent train streams and padded eval.

The train stream is one global sequence of examples: the whole split -> shuffle -> repeat
forever (grain reseeds the shuffle every epoch) -> per-example augmentation with grain's
per-index RNG. Global batch i is examples [i*B, (i+1)*B) of it, and process p of P reads the
p-th of its P equal slices. So every global batch is a pure function of (seed, step), whatever
the number of processes, and the data position is the train step itself: a run resumed at step
s, on any number of processes, reads from global batch s on, skipping and repeating nothing.
"""

import math
import os
import signal

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
    # Threads of this process decode whole batches ahead, one per core by default (PIL releases
    # the GIL while it decodes and resizes).
    threads = cfg.num_threads or len(os.sched_getaffinity(0))
    return ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(cfg.prefetch, threads)))
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) use defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
      grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                   per_worker_buffer_size=cfg.prefetch),
      worker_init_fn=_ignore_termination)


def _ignore_termination(worker_index: int, worker_count: int) -> None:
  """grain's worker_init_fn (it passes both arguments; neither is needed here).

  A scheduler's SIGTERM reaches every process of the job: the workers keep feeding the
  main process until it has saved its preemption checkpoint and closes them."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_train_dataset(data_cfg, *, kind: str, image_size, global_batch_size: int, seed: int,
                        mask_cfg=None, process_index=None, process_count=None,
                        start_step: int = 0) -> grain.IterDataset:
  """This process's slices of global batches start_step, start_step + 1, ... (module doc)."""
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
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  records, _ = open_split(data_cfg, "train")
  if len(records) == 0:
    raise ValueError(f"data.train_split: no examples in {data_cfg.train_split!r}")
  shuffle_seed = seed if data_cfg.shuffle_seed is None else data_cfg.shuffle_seed
  ds = grain.MapDataset.source(records).shuffle(seed=_derived_seed(1, shuffle_seed)).repeat()
  ds = ds.random_map(transform, seed=_derived_seed(2, seed))
  # Slices of `batch_size` consecutive examples; global batch i is slices i*P .. i*P + P-1.
  ds = ds.batch(batch_size)[start_step * process_count + process_index::process_count]
  return _to_iter(ds, data_cfg)


def build_train_iterator(data_cfg, *, kind: str, image_size, global_batch_size: int, seed: int,
                         mask_cfg=None, process_index=None, process_count=None,
                         start_step: int = 0) -> grain.DatasetIterator:
  """Infinite iterator of this process's batches; `get_state()` is a JSON-serialisable dict.

  supervised: {'image': float32 [b, H, W, 3], 'label': int32 [b]}
  simmim:     {'image': float32 [b, H, W, 3], 'mask': int32 [b, H/model_patch, W/model_patch]}
  with b = global_batch_size // process_count. process_index/process_count default to jax's.
  """
  return iter(build_train_dataset(
      data_cfg, kind=kind, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      mask_cfg=mask_cfg, process_index=process_index, process_count=process_count,
      start_step=start_step))


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
