"""Images/s of the train input pipeline alone (no model), supervised and SimMIM.

  python benchmarks/input_pipeline.py --dataset=digits --image_size=32 --workers=0
  python benchmarks/input_pipeline.py --dataset=synthetic --image_size=224 --workers=2
  python benchmarks/input_pipeline.py --dataset=folder --folder=/data/imagenet --image_size=224

`synthetic` writes ImageNet-like JPEGs (500x375, random content) into a temporary class folder
tree, so decoding cost is included as it would be for a real folder / tfds data set.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from swinv2_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position

_DATASET = flags.DEFINE_enum("dataset", "digits", ["digits", "synthetic", "folder"], "data source")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (digits)")
_FOLDER = flags.DEFINE_string("folder", None, "image root for --dataset=folder")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "output image size")
_BATCH = flags.DEFINE_integer("batch", 64, "batch size (this process)")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain worker processes (0 = in-process threads)")
_THREADS = flags.DEFINE_integer("threads", 0, "data.num_threads (0 = one per core)")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "data.prefetch")
_STEPS = flags.DEFINE_integer("steps", 20, "timed batches")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed batches first (worker start-up)")
_KIND = flags.DEFINE_enum("kind", "both", ["supervised", "simmim", "both"], "pipeline(s) to time")
_NUM_SYNTHETIC = flags.DEFINE_integer("num_synthetic", 256, "synthetic images to write")


def _write_synthetic(root: str, num_images: int):
  rng = np.random.default_rng(0)
  for i in range(num_images):
    class_dir = os.path.join(root, "train", f"class_{i % 10}")
    os.makedirs(class_dir, exist_ok=True)
    # smooth random content so the JPEG is a realistic size (pure noise compresses badly)
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(
        os.path.join(class_dir, f"{i:05d}.jpg"), quality=90)


def _images_per_second(cfg, kind: str) -> float:
  mask_cfg = dict(mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
  size = _IMAGE_SIZE.value if kind == "supervised" else max(32, _IMAGE_SIZE.value // 32 * 32)
  it = data.build_train_iterator(cfg, kind=kind, image_size=size, global_batch_size=_BATCH.value,
                                 seed=0, mask_cfg=mask_cfg, process_index=0, process_count=1)
  try:
    for _ in range(_WARMUP.value):
      next(it)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    return _STEPS.value * _BATCH.value / (time.perf_counter() - start)
  finally:
    it.close()


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    if _DATASET.value == "digits":
      cfg = data.default_data_config("digits")
      cfg.data_dir = _DATA_DIR.value or os.path.join(tmp, "tfds")
    else:
      cfg = data.default_data_config("folder")
      cfg.folder = _FOLDER.value
      if _DATASET.value == "synthetic":
        cfg.folder = os.path.join(tmp, "synthetic")
        _write_synthetic(cfg.folder, _NUM_SYNTHETIC.value)
    cfg.num_workers, cfg.num_threads, cfg.prefetch = (_WORKERS.value, _THREADS.value,
                                                      _PREFETCH.value)
    # The cores that decode: the worker processes, else the reader's threads.
    cores = min(_WORKERS.value or _THREADS.value or len(os.sched_getaffinity(0)),
                len(os.sched_getaffinity(0)))
    kinds = ["supervised", "simmim"] if _KIND.value == "both" else [_KIND.value]
    for kind in kinds:
      rate = _images_per_second(cfg, kind)
      print(f"{kind:10s} dataset={_DATASET.value} size={_IMAGE_SIZE.value} batch={_BATCH.value} "
            f"workers={_WORKERS.value} threads={_THREADS.value}: {rate:,.0f} images/s on "
            f"{cores} cores, {rate / cores:,.0f} images/s per core", flush=True)


if __name__ == "__main__":
  app.run(main)
