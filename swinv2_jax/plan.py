"""The memory plan: compile the real train step ahead of time for a target mesh, on fake CPU
devices, and report what one device holds (MaxText's train_compile.py, in spirit).

  python -m swinv2_jax.main --config=configs/g_1536.py --workdir=DIR --config.dry_run=True

Nothing is allocated: the train state is abstract (`jax.eval_shape`), the step is lowered for
`plan.num_devices` CPU devices and compiled; XLA's buffer assignment then gives the temporaries
(activations, gradients, collectives' buffers) of one device, and the shardings give the bytes
of parameters and optimizer state. XLA's default CPU scheduler keeps rematerialised activations
alive (it schedules for speed), which hides what remat saves; the plan compiles with the
memory-optimised scheduler instead, closer to what the GPU/TPU schedulers do under pressure.
"""

from __future__ import annotations

import json
import os
import resource
import time

import jax
from absl import logging

from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import trainer as trainer_lib
from swinv2_jax.models import complexity

MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


class DeviceSetupError(RuntimeError):
  """The fake CPU devices of a dry run cannot be set up in this process."""


def use_fake_cpu_devices(num_devices: int) -> list:
  """Makes JAX run on `num_devices` CPU devices with the memory-optimised scheduler.

  Must run before JAX creates its backend (the first jax.devices() or computation); a second
  call in the same process is fine when the backend it made has enough CPU devices.
  """
  from jax._src import xla_bridge  # the public API has no "is the backend up?" query
  if not xla_bridge.backends_are_initialized():
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), MEMORY_SCHEDULER_FLAG) if f)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  devices = jax.devices()
  problems = []
  if devices[0].platform != "cpu":
    problems.append(f"the backend is {devices[0].platform}, not cpu")
  if len(devices) < num_devices:
    problems.append(f"it has {len(devices)} devices, not {num_devices}")
  if MEMORY_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    problems.append("XLA_FLAGS lacks " + MEMORY_SCHEDULER_FLAG)
  if problems:
    raise DeviceSetupError(
        "dry run: JAX was initialised before the plan could set up its fake devices ("
        + "; ".join(problems) + "). Run the dry run in a fresh process, or start it with "
        f"JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES={num_devices} XLA_FLAGS={MEMORY_SCHEDULER_FLAG}")
  return devices[:num_devices]


def _num_classes(config) -> int:
  """Classes of the configured data set; the data need not be on this machine for a plan."""
  try:
    return data_lib.dataset_info(config.data).num_classes
  except Exception as e:  # pylint: disable=broad-except
    logging.info("dry run: data set %s not readable (%s): head sized for 1000 classes",
                 config.data.name, type(e).__name__)
    return 1000


def training_flops(config, stage: str, global_batch: int) -> float:
  """Model FLOPs of one step: 2 FLOPs per MAC, backward twice the forward (remat not counted,
  as MFU is usually reported). MACs from the official-style count of the backbone."""
  args = config_lib.model_args(config, "finetune" if stage == "finetune" else "pretrain")
  if stage == "pretrain":
    args["num_classes"] = 0
  return 3 * 2 * complexity.count_macs(args) * global_batch


def memory_summary(compiled, trainer: trainer_lib.Trainer) -> dict:
  """Per-device bytes of params / optimizer state from the shardings, temporaries from XLA."""
  params = sharding_lib.per_device_bytes(trainer.abstract_state["params"],
                                         trainer.state_shardings["params"])
  opt = sharding_lib.per_device_bytes(trainer.abstract_state["opt_state"],
                                      trainer.state_shardings["opt_state"])
  if "ema" in trainer.abstract_state:
    opt += sharding_lib.per_device_bytes(trainer.abstract_state["ema"],
                                         trainer.state_shardings["ema"])
  mem = compiled.memory_analysis()
  temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return dict(params=params, opt_state=opt, temp=temp, total=params + opt + temp,
              flops_per_step=flops)


def summarize(trainer: trainer_lib.Trainer, compiled, config, *, global_batch: int,
              compile_s: float) -> dict:
  """Everything the table and plan.json report, from the compiled step and the shardings."""
  memory = memory_summary(compiled, trainer)
  grads = sharding_lib.per_device_bytes(trainer.abstract_state["params"],
                                        trainer.layout.grads(trainer.abstract_state["params"]))
  analysis = compiled.memory_analysis()
  mesh = trainer.layout.mesh
  model = config.model
  return dict(
      stage=trainer.task.name,
      params=int(trainer.num_params),
      flops_per_step=training_flops(config, trainer.task.name, global_batch),
      xla_flops_per_device=memory["flops_per_step"],
      mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
      global_batch=global_batch,
      per_device_bytes=dict(
          params=memory["params"], opt_state=memory["opt_state"],
          grads=grads,  # held inside `temp` during the step; listed to show the ZeRO split
          temp=memory["temp"], total=memory["total"],
          xla_arguments=int(getattr(analysis, "argument_size_in_bytes", 0)),
          xla_aliased=int(getattr(analysis, "alias_size_in_bytes", 0))),
      compile_s=round(compile_s, 2),
      settings=dict(
          zero_stage=trainer.layout.zero_stage, remat=model.remat,
          attention_chunks=model.attention_chunks, dtype=model.dtype,
          model=model.name, img_size=trainer.task.stage_cfg.img_size,
          window_size=trainer.task.stage_cfg.window_size,
          platform=jax.devices()[0].platform,
          scheduler=("memory-optimised" if MEMORY_SCHEDULER_FLAG in
                     os.environ.get("XLA_FLAGS", "") else "default")),
  )


def _gib(n: float) -> str:
  return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.1f} MiB"


def format_table(summary: dict) -> str:
  """A fixed-width table of one plan (printed by the dry run and before step 0 of a run)."""
  b, s = summary["per_device_bytes"], summary["settings"]
  mesh = " x ".join(f"{k}={v}" for k, v in summary["mesh"].items())
  rows = [
      ("stage", f"{summary['stage']} ({s['model']}, {s['img_size']} px, window "
                f"{s['window_size']}, {s['dtype']})"),
      ("mesh", f"{mesh}, global batch {summary['global_batch']}"),
      ("techniques", f"ZeRO {s['zero_stage']}, remat {s['remat']}, "
                     f"attention chunks {s['attention_chunks']}"),
      ("parameters", f"{summary['params']:,}"),
      ("FLOPs / step", f"{summary['flops_per_step']:.3e} (model); XLA counts "
                       f"{summary['xla_flops_per_device']:.3e} per device"),
      ("per device", ""),
      ("  params", _gib(b["params"])),
      ("  optimizer state", _gib(b["opt_state"])),
      ("  gradients", _gib(b["grads"]) + "  (inside temporaries)"),
      ("  activations/temp", _gib(b["temp"])),
      ("  total", _gib(b["total"])),
      ("compile", f"{summary['compile_s']:.1f} s on {s['platform']} "
                  f"({s['scheduler']} scheduler)"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def dry_run(config, workdir: str) -> dict:
  """Compiles the step of `config.plan.stage` for `config.plan.num_devices` fake devices,
  prints the table and writes `workdir/plan.json`; returns the summary."""
  config_lib.validate(config)
  p = config.plan
  devices = use_fake_cpu_devices(p.num_devices)
  layout = trainer_lib.make_layout(config, devices)
  task = (trainer_lib.simmim_task(config) if p.stage == "pretrain"
          else trainer_lib.finetune_task(config, _num_classes(config)))
  trainer = trainer_lib.make_trainer(config, task, layout)
  global_batch = p.per_device_batch * p.num_devices
  start = time.perf_counter()
  batch_spec = trainer_lib.abstract_batch(config, task, global_batch)
  compiled = trainer_lib.compile_step(trainer, batch_spec)
  compile_s = time.perf_counter() - start
  summary = summarize(trainer, compiled, config, global_batch=global_batch, compile_s=compile_s)
  # ru_maxrss is in KiB on Linux: the peak of this whole process, compile included.
  summary["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "plan.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)
  print(f"dry run: {p.num_devices} fake CPU devices, XLA memory-optimised CPU scheduler "
        f"({MEMORY_SCHEDULER_FLAG})\n{format_table(summary)}\nwritten to {path}", flush=True)
  return summary
