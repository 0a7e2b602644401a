"""Compiled temporaries of the fine-tune train step per remat policy and sequential attention.

Compiles (never runs) the real train step on one CPU device and prints XLA's
`memory_analysis().temp_size_in_bytes`: activations kept for the backward pass, gradients and
scratch. Compiled with the memory-optimised CPU scheduler (the default one schedules for speed
and keeps rematerialised activations alive, hiding what remat saves); `--default_scheduler`
adds one row compiled with the default scheduler for comparison.

  python benchmarks/memory.py                      # SwinV2-T at 256/w8, batch 2
  python benchmarks/memory.py --model=small        # the tiny G of configs/g_1536.py at 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

import g_1536  # noqa: E402  (configs/, on the path above)
from swinv2_jax import config as config_lib  # noqa: E402
from swinv2_jax import plan  # noqa: E402
from swinv2_jax import trainer as trainer_lib  # noqa: E402

REMATS = ("none", "full", "dots", "dots_no_batch")


def model_config(model: str, batch: int):
  """The fine-tune config of SwinV2-T at 256/w8 or of the tiny G, for one device."""
  if model == "t":
    c = config_lib.base_config()
    c.model.name = "swinv2_tiny_window8_256"
    f = c.finetune
    f.img_size, f.window_size, f.pretrained_window_sizes = 256, 8, 0
    # 64 and 16 windows in the first two stages: pieces of 8 and 4 windows.
    chunks = (8, 4, 1, 1)
  else:
    c = g_1536.get_config("tiny")
    chunks = c.model.attention_chunks
  c.finetune.batch_size, c.finetune.accum_steps = batch, 1
  c.data.mixup_alpha = c.data.cutmix_alpha = 0.0
  c.plan.num_devices = 1
  c.mesh.zero = 0
  return c, tuple(chunks)


def compiled_temp(config, devices, compiler_options=None) -> tuple[int, float]:
  layout = trainer_lib.make_layout(config, devices)
  task = trainer_lib.finetune_task(config, 1000)
  trainer = trainer_lib.make_trainer(config, task, layout)
  batch = trainer_lib.trainer_batch(config, trainer)
  start = time.perf_counter()
  compiled = trainer_lib.lower_step(trainer, batch).compile(compiler_options)
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("t", "small"), default="t")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--remats", default=",".join(REMATS))
  parser.add_argument("--default_scheduler", action="store_true")
  args = parser.parse_args()
  devices = plan.use_fake_cpu_devices(1)
  base, chunks = model_config(args.model, args.batch)
  print(f"{base.model.name if args.model == 't' else 'tiny G'} fine-tune step, "
        f"{base.finetune.img_size} px, batch {args.batch}, {base.model.dtype}, one CPU device, "
        f"memory-optimised scheduler unless noted")
  print(f"{'remat':<14} {'sequential attention':<22} {'temp MiB':>9} {'compile s':>10}")
  rows = [(r, c) for r in args.remats.split(",") for c in ((1,) * len(chunks), chunks)]
  for remat, pieces in rows:
    config, _ = model_config(args.model, args.batch)
    config.model.remat, config.model.attention_chunks = remat, pieces
    temp, seconds = compiled_temp(config, devices)
    label = "off" if max(pieces) == 1 else f"on {pieces}"
    print(f"{remat:<14} {label:<22} {temp / 2**20:9.1f} {seconds:10.1f}", flush=True)
  if args.default_scheduler:
    for remat in ("none", "full"):
      config, _ = model_config(args.model, args.batch)
      config.model.remat, config.model.attention_chunks = remat, 1
      temp, seconds = compiled_temp(
          config, devices, {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
      print(f"{remat:<14} {'off, default sched.':<22} {temp / 2**20:9.1f} {seconds:10.1f}",
            flush=True)


if __name__ == "__main__":
  main()
