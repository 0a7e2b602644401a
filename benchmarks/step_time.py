"""CPU time of one fine-tune train step of SwinV2-T with and without remat and sequential
attention (the paper reports remat "up to 30% slower"; this shows the CPU cost, not a GPU's).

  python benchmarks/step_time.py                       # 2 images at 256/w8, 3 timed steps
  python benchmarks/step_time.py --variants=none:1,full:1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import memory  # noqa: E402  (benchmarks/memory.py: the same SwinV2-T config)
from swinv2_jax import plan  # noqa: E402
from swinv2_jax import trainer as trainer_lib  # noqa: E402

# remat policy : sequential attention (1 = off, else the T pieces per level of memory.py)
DEFAULT_VARIANTS = "none:1,full:1,dots:1,none:seq,full:seq"


def step_seconds(config, devices, steps: int) -> tuple[float, float]:
  """(median seconds per step after one warm-up step, compile seconds)."""
  layout = trainer_lib.make_layout(config, devices)
  task = trainer_lib.finetune_task(config, 1000)
  trainer = trainer_lib.make_trainer(config, task, layout)
  spec = trainer_lib.trainer_batch(config, trainer)
  start = time.perf_counter()
  compiled = trainer_lib.compile_step(trainer, spec)
  compile_s = time.perf_counter() - start
  rng = np.random.default_rng(0)
  batch = dict(image=rng.normal(size=spec["image"].shape).astype(np.float32),
               label=rng.integers(0, 1000, spec["label"].shape).astype(np.int32))
  shardings = trainer_lib.batch_shardings(layout, spec)
  batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
  key = jax.device_put(jax.random.key(0), layout.replicated())
  state = trainer.init()
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics)
    if i:  # the first step pays for allocation and warm-up
      times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
  return statistics.median(times), compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default=DEFAULT_VARIANTS)
  args = parser.parse_args()
  devices = plan.use_fake_cpu_devices(1)
  print(f"SwinV2-T fine-tune step, 256 px, batch {args.batch}, float32, one CPU device "
        f"({os.cpu_count()} cores), median of {args.steps} steps")
  print(f"{'remat':<14} {'sequential attention':<22} {'s/step':>8} {'vs none/off':>12} "
        f"{'compile s':>10}")
  baseline = None
  for variant in args.variants.split(","):
    remat, seq = variant.split(":")
    config, chunks = memory.model_config("t", args.batch)
    config.model.remat = remat
    config.model.attention_chunks = chunks if seq == "seq" else 1
    seconds, compile_s = step_seconds(config, devices, args.steps)
    baseline = baseline or seconds
    label = f"on {chunks}" if seq == "seq" else "off"
    print(f"{remat:<14} {label:<22} {seconds:8.2f} {seconds / baseline:11.2f}x "
          f"{compile_s:10.1f}", flush=True)


if __name__ == "__main__":
  main()
