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
from swinv2_jax import errors
from swinv2_jax import models
from swinv2_jax import paths
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import trainer as trainer_lib
from swinv2_jax.models import complexity

MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


class DeviceSetupError(RuntimeError, errors.UserError):
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


def model_flops(config, stage: str, batch: int) -> float:
  """Model FLOPs: 2 per MAC of the official-style count; a training step adds the backward,
  twice the forward (remat not counted, as MFU is usually reported)."""
  args = config_lib.model_args(config, "pretrain" if stage == "pretrain" else "finetune")
  if stage == "pretrain":
    args["num_classes"] = 0
  forward = 2 * complexity.count_macs(args) * batch
  return forward if stage == "eval" else 3 * forward


def _state_bytes(trainer: trainer_lib.Trainer, key: str) -> int:
  if key not in trainer.abstract_state:
    return 0
  return sharding_lib.per_device_bytes(trainer.abstract_state[key], trainer.state_shardings[key])


def _xla_figures(compiled) -> dict:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  get = lambda name: int(getattr(mem, name, 0)) if mem is not None else 0
  return dict(temp=get("temp_size_in_bytes"), arguments=get("argument_size_in_bytes"),
              aliased=get("alias_size_in_bytes"),
              flops=float(cost.get("flops", 0.0)) if cost else 0.0)


def memory_summary(compiled, trainer: trainer_lib.Trainer) -> dict:
  """Per-device bytes of params / optimizer state (+ EMA) from the shardings, temporaries
  (activations, gradients and their accumulated sum, collectives' buffers) from XLA."""
  params = _state_bytes(trainer, "params")
  opt = _state_bytes(trainer, "opt_state") + _state_bytes(trainer, "ema")
  xla = _xla_figures(compiled)
  return dict(params=params, opt_state=opt, temp=xla["temp"], total=params + opt + xla["temp"],
              xla_arguments=xla["arguments"], xla_aliased=xla["aliased"],
              xla_flops_per_device=xla["flops"])


def wall_time(config, flops_per_step: float, steps: int, num_devices: int) -> dict:
  """Estimated time of a step and of a stage on `plan.accelerator` at `plan.mfu`."""
  peak = config_lib.ACCELERATORS[config.plan.accelerator] * 1e12
  step_s = flops_per_step / (num_devices * peak * config.plan.mfu)
  return dict(accelerator=config.plan.accelerator, mfu=config.plan.mfu,
              step_s=step_s, stage_hours=step_s * steps / 3600,
              device_days=step_s * steps * num_devices / 86400)


def summarize(trainer: trainer_lib.Trainer, compiled, config, *, compile_s: float) -> dict:
  """Everything the table and plan.json report of one training stage."""
  memory = memory_summary(compiled, trainer)
  params_shape = trainer.abstract_state["params"]
  grads = sharding_lib.per_device_bytes(params_shape, trainer.layout.grads(params_shape))
  mesh = trainer.layout.mesh
  s = trainer.task.stage_cfg
  flops = model_flops(config, trainer.task.name, s.batch_size)
  return dict(
      stage=trainer.task.name,
      flops_per_image=model_flops(config, trainer.task.name, 1),
      global_batch=s.batch_size,
      accum_steps=trainer.accum_steps,
      microbatch_per_device=s.batch_size // (trainer.accum_steps * mesh.size),
      mesh=dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape))),
      params=int(trainer.num_params),
      flops_per_step=flops,
      xla_flops_per_device=memory["xla_flops_per_device"],
      per_device_bytes=dict(
          params=memory["params"], opt_state=memory["opt_state"],
          grads=grads,  # held inside `temp` during the step; listed to show the ZeRO split
          temp=memory["temp"], total=memory["total"],
          xla_arguments=memory["xla_arguments"], xla_aliased=memory["xla_aliased"]),
      steps=s.steps,
      estimate=wall_time(config, flops, s.steps, mesh.size),
      compile_s=round(compile_s, 2),
      settings=_settings(config, trainer.layout, s.img_size, s.window_size),
  )


def describe_model(config) -> str:
  """The model as configured: 'SwinV2 C=48, depths (2, 2, 2, 2), heads (3, 6, 12, 24), patch 4
  (custom: swinv2_tiny_window8_256 with embed_dim, depths changed)'."""
  m = config.model
  args = config_lib.model_args(config, "finetune")
  text = (f"SwinV2 C={args['embed_dim']}, depths {tuple(args['depths'])}, heads "
          f"{tuple(args['num_heads'])}, patch {args['patch_size']}")
  if args.get("extra_norm_period"):
    text += f", extra norm every {args['extra_norm_period']} blocks"
  preset = models.PRESETS[m.name]
  changed = [k for k in ("embed_dim", "depths", "num_heads", "extra_norm_period")
             if m[k] is not None and _as_tuple(m[k]) != _as_tuple(preset.get(k))]
  return text + (f" (custom: {m.name} with {', '.join(changed)} changed)" if changed
                 else f" ({m.name})")


def _as_tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _settings(config, layout, img_size, window_size) -> dict:
  m = config.model
  device = layout.mesh.devices.flat[0]
  return dict(
      zero=layout.zero, remat=m.remat, attention_chunks=m.attention_chunks,
      dtype=m.dtype, model=describe_model(config),
      img_size=img_size, window_size=window_size, platform=device.platform,
      device_kind=device.device_kind,
      scheduler=("memory-optimised" if MEMORY_SCHEDULER_FLAG in
                 os.environ.get("XLA_FLAGS", "") else "default"))


def summarize_eval(config, eval_step, compiled, *, compile_s: float) -> dict:
  """The eval entry: parameters as sharded in training, temporaries of one eval batch."""
  mesh = eval_step.layout.mesh
  params = sharding_lib.per_device_bytes(eval_step.abstract_params, eval_step.param_shardings)
  xla = _xla_figures(compiled)
  return dict(
      stage="eval", global_batch=config.eval.batch_size, accum_steps=1,
      microbatch_per_device=config.eval.batch_size // mesh.size,
      mesh=dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape))),
      params=int(sum(x.size for x in jax.tree.leaves(eval_step.abstract_params))),
      flops_per_image=model_flops(config, "eval", 1),
      flops_per_step=model_flops(config, "eval", config.eval.batch_size),
      xla_flops_per_device=xla["flops"],
      per_device_bytes=dict(params=params, opt_state=0, grads=0, temp=xla["temp"],
                            total=params + xla["temp"], xla_arguments=xla["arguments"],
                            xla_aliased=xla["aliased"]),
      compile_s=round(compile_s, 2),
      settings=_settings(config, eval_step.layout, config.finetune.img_size,
                         config.finetune.window_size))


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


class DoesNotFitError(ValueError, errors.UserError):
  """Not even one image per device fits the memory budget."""


def fit_accum_steps(config, task, layout, budget_bytes: float | None = None):
  """accum_steps='auto': the largest per-device microbatch whose compiled step fits.

  The candidates are the divisors of the per-device share of the global batch. Per-device
  bytes grow with the microbatch (activations) on top of a fixed part (state), so the search
  keeps the largest microbatch known to fit and the smallest known not to, and compiles the
  largest candidate between them that a straight line through those two predicts to fit (or
  the next one up, when none is predicted to: the line is a guess, the compile decides).
  Memory is monotone in the microbatch, so the answer is exact; G takes 4-5 compiles.
  Returns (trainer, compiled).
  """
  budget = budget_bytes or config.plan.device_memory_gb * 2**30
  per_device = task.stage_cfg.batch_size // layout.mesh.size
  options = _divisors(per_device)
  totals, best = {}, {}  # bytes per microbatch; the compiled step of the largest that fits

  def measure(micro) -> float:
    if micro not in totals:
      start = time.perf_counter()
      trainer = trainer_lib.make_trainer(config, task, layout, per_device // micro)
      compiled = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
      totals[micro] = memory_summary(compiled, trainer)["total"]
      logging.info("%s: microbatch %d per device (accum_steps %d): %.2f GiB per device, "
                   "compiled in %.0f s", task.name, micro, per_device // micro,
                   totals[micro] / 2**30, time.perf_counter() - start)
      if totals[micro] <= budget and micro > best.get("micro", 0):
        best.update(micro=micro, trainer=trainer, compiled=compiled)
    return totals[micro]

  if measure(1) > budget:
    raise DoesNotFitError(
        f"config.{task.name}.accum_steps='auto': one image per device needs "
        f"{measure(1) / 2**30:.1f} GiB, over plan.device_memory_gb="
        f"{config.plan.device_memory_gb}; add devices, raise mesh.zero, or set "
        f"model.remat / model.attention_chunks")
  fits, over = 1, None
  while True:
    between = [m for m in options if m > fits and (over is None or m < over)]
    if not between:
      break
    if over is None:
      guess = between[-1]  # the whole share in one microbatch
    else:
      slope = (measure(over) - measure(fits)) / (over - fits)
      reach = fits + (budget - measure(fits)) / slope
      predicted = [m for m in between if m <= reach]
      guess = predicted[-1] if predicted else between[0]
    if measure(guess) <= budget:
      fits = guess
    else:
      over = guess
  return best["trainer"], best["compiled"]


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _duration(hours: float) -> str:
  return f"{hours * 60:.1f} min" if hours < 1 else (
      f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days")


def format_table(*summaries: dict, dataset: data_lib.DatasetInfo | None = None,
                 estimate: bool = True) -> str:
  """A fixed-width table with one column per stage (printed by the dry run, and before step 0
  of every training stage with the data set's sizes and without the wall-time estimate)."""
  first = summaries[0]
  st = first["settings"]
  mesh = " x ".join(f"{k}={v}" for k, v in first["mesh"].items())
  num_devices = 1
  for size in first["mesh"].values():
    num_devices *= size
  head = [f"model: {st['model']}, {st['dtype']}",
          f"mesh: {mesh} ({num_devices} x {st.get('device_kind', st['platform'])}), ZeRO "
          f"{st['zero']}, remat {st['remat']}, attention chunks {st['attention_chunks']}"]
  if dataset is not None:
    head.append(f"data: {dataset.num_train_examples:,} train / {dataset.num_eval_examples:,} "
                f"eval examples, {dataset.num_classes} classes")

  def steps(x):
    if "steps" not in x:  # the eval column
      return f"{dataset.num_eval_examples:,} images" if dataset else "-"
    if dataset is None:
      return f"{x['steps']:,}"
    epochs = x["steps"] * x["global_batch"] / dataset.num_train_examples
    return f"{x['steps']:,} ({epochs:,.1f} epochs)"

  col = lambda f: [f(x) for x in summaries]
  b = lambda key: col(lambda x: _gib(x["per_device_bytes"][key]))
  rows = [("", [x["stage"] for x in summaries]),
          ("image size / window", col(lambda x: f"{x['settings']['img_size']} / "
                                                f"{x['settings']['window_size']}")),
          ("parameters", col(lambda x: f"{x['params']:,}")),
          ("model FLOPs / image", col(lambda x: f"{x['flops_per_image']:.3e}" + (
              "" if x["stage"] == "eval" else " (x3: fwd+bwd)"))),
          ("model FLOPs / step", col(lambda x: f"{x['flops_per_step']:.3e}")),
          ("global batch", col(lambda x: f"{x['global_batch']:,}")),
          ("accumulation x micro", col(lambda x: f"{x['accum_steps']} x "
                                                 f"{x['microbatch_per_device']}/device")),
          ("steps", col(steps)),
          ("params / device", b("params")),
          ("optimizer state / device", b("opt_state")),
          ("gradients / device", col(lambda x: "-" if x["stage"] == "eval" else
                                     _gib(x["per_device_bytes"]["grads"]) + " (in temp)")),
          ("activations+temp / device", b("temp")),
          ("total / device", b("total"))]
  estimates = [x for x in summaries if "estimate" in x]  # the training stages'
  if estimate and estimates:
    e = estimates[0]["estimate"]
    rows += [(f"step at {e['mfu']:.0%} MFU, {e['accelerator']}",
              col(lambda x: f"{x['estimate']['step_s']:.3g} s" if "estimate" in x else "-")),
             ("stage", col(lambda x: f"{_duration(x['estimate']['stage_hours'])}, "
                                     f"{x['estimate']['device_days']:.1f} device-days"
                                     if "estimate" in x else "-"))]
  rows.append(("compile", col(lambda x: f"{x['compile_s']:.1f} s")))
  width = max(len(k) for k, _ in rows)
  widths = [max(len(r[1][i]) for r in rows) for i in range(len(summaries))]
  lines = head + [f"{k:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(vals, widths))
                  for k, vals in rows]
  lines.append(f"compiled on {st['platform']} ({st['scheduler']} scheduler)")
  return "\n".join(lines)


def plan_stages(config, layout, num_classes: int) -> dict:
  """Compiles every stage of the config on `layout` and summarises each."""
  stages = {}
  for name in config_lib.TRAINING_STAGES:
    if name not in tuple(config.stages):
      continue
    task = (trainer_lib.simmim_task(config) if name == "pretrain"
            else trainer_lib.finetune_task(config, num_classes))
    start = time.perf_counter()
    if task.stage_cfg.accum_steps == "auto":
      trainer, compiled = fit_accum_steps(config, task, layout)
    else:
      trainer = trainer_lib.make_trainer(config, task, layout)
      compiled = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
    stages[name] = summarize(trainer, compiled, config, compile_s=time.perf_counter() - start)
    del trainer, compiled
  if "eval" in tuple(config.stages):
    start = time.perf_counter()
    eval_step = trainer_lib.make_eval_step(config, num_classes, layout)
    compiled = trainer_lib.compile_eval_step(config, eval_step)
    stages["eval"] = summarize_eval(config, eval_step, compiled,
                                    compile_s=time.perf_counter() - start)
  return stages


def dry_run(config, workdir: str) -> dict:
  """Compiles every stage of the config for `config.plan.num_devices` fake devices, prints
  the table and writes `workdir/plan.json`; returns the plan."""
  config_lib.validate(config)
  p = config.plan
  config_lib.check_batches(config, p.num_devices)
  devices = use_fake_cpu_devices(p.num_devices)
  layout = trainer_lib.make_layout(config, devices)
  start = time.perf_counter()
  stages = plan_stages(config, layout, _num_classes(config))
  result = dict(stages=stages, num_devices=p.num_devices,
                device_memory_gb=p.device_memory_gb,
                fits=all(x["per_device_bytes"]["total"] <= p.device_memory_gb * 2**30
                         for x in stages.values()),
                plan_s=round(time.perf_counter() - start, 1),
                # ru_maxrss is in KiB on Linux: the peak of this whole process.
                host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  paths.makedirs(workdir)
  path = paths.join(workdir, "plan.json")
  paths.write_text(path, json.dumps(result, indent=2))
  print(f"dry run: {p.num_devices} fake CPU devices, XLA memory-optimised CPU scheduler "
        f"({MEMORY_SCHEDULER_FLAG})\n{format_table(*stages.values())}\n"
        f"{'fits' if result['fits'] else 'does NOT fit'} {p.device_memory_gb} GiB per device; "
        f"planned in {result['plan_s']:.0f} s; written to {path}", flush=True)
  return result
