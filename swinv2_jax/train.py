"""The main job: SimMIM pretraining -> supervised fine-tuning -> evaluation.

The training loop of a stage (resumable), evaluation and the outputs of a run; what a stage
compiles (task, sharded state, step) is in trainer.py.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import errors
from swinv2_jax import paths
from swinv2_jax import plan as plan_lib
from swinv2_jax import preemption
from swinv2_jax import progress as progress_lib
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import workdir as workdir_lib
from swinv2_jax.loading import finetune_init_params
from swinv2_jax.loading import load_eval_params

Params = trainer_lib.Params


# ---------------------------------------------------------------------------------------------
# Training loop of one stage (resumable).
# ---------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError, errors.UserError):
  pass


def prior_eval_records(workdir: str, up_to_step: int) -> list[dict]:
  """Evaluations made while fine-tuning up to a step (metrics.jsonl, process 0)."""
  if jax.process_index() != 0:
    return []
  return workdir_lib.eval_records(workdir, up_to_step)


def train_stage(config, workdir: str, task: trainer_lib.Task, layout,
                writer: progress_lib.MetricWriter, init_params: Params | None = None,
                evaluator: "Evaluator | None" = None, *, watch: preemption.Watch | None = None,
                config_record: dict | None = None, progress: progress_lib.Progress | None = None):
  """Runs (or resumes, or skips when complete) one training stage.

  Resumes from the newest intact checkpoint (damaged ones are moved aside), on any number of
  processes and devices. With `watch`, a SIGTERM saves at the next step and raises Preempted.
  Returns its final state and the evaluations made while training (`<stage>.eval_every`).
  """
  s = task.stage_cfg
  watch = watch or preemption.Watch()
  progress = progress or progress_lib.Progress(config)
  config_record = config_record or workdir_lib.config_json(config)
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, task.name)
  mngr = checkpointing.manager(ckpt_dir, keep=config.checkpoint.keep,
                               use_async=config.checkpoint.use_async)
  shapes = trainer_lib.make_trainer(config, task, layout, accum_steps=1)  # state shapes only
  restored = checkpointing.restore_latest(mngr, shapes.abstract_state, shapes.state_shardings,
                                          what=task.name, config=config_record)
  latest = None if restored is None else restored[0]
  if latest is not None and latest >= s.steps:
    logging.info("%s: complete (checkpoint at step %d), restored", task.name, latest)
    return restored[1], prior_eval_records(workdir, latest)

  if watch.pending():  # signalled between stages: stop before compiling this one
    raise preemption.Preempted(task.name, latest or 0, ckpt_dir, before_stage=True)
  progress.compiling(task.name)
  compile_start = time.perf_counter()
  if s.accum_steps == "auto":
    trainer, compiled = plan_lib.fit_accum_steps(config, task, layout)
  else:
    trainer = trainer_lib.make_trainer(config, task, layout)
    compiled = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
  progress.compiled(plan_lib.summarize(trainer, compiled, config,
                                       compile_s=time.perf_counter() - compile_start))
  if watch.pending():  # signalled while compiling: nothing of this stage is done yet
    raise preemption.Preempted(task.name, latest or 0, ckpt_dir, before_stage=True)
  # TensorBoard's SimMIM images (pretrain.image_every), by a jitted function of their own.
  draw_images = progress_lib.reconstruction_images(config, trainer, layout, writer, progress)

  mask_cfg = dict(mask_patch_size=config.pretrain.mask_patch_size,
                  model_patch_size=config.model.patch_size,
                  mask_ratio=config.pretrain.mask_ratio)
  # The data position is the step (data/pipeline.py): the stream starts at the checkpoint's.
  iterator = data_lib.build_train_iterator(
      config.data, kind=task.data_kind, image_size=s.img_size, global_batch_size=s.batch_size,
      seed=config.seed, mask_cfg=mask_cfg if task.data_kind == "simmim" else None,
      start_step=latest or 0)
  if latest is not None:
    state = restored[1]
    logging.info("%s: resumed from step %d", task.name, latest)
  else:
    state = trainer.init()
    if init_params is not None:
      state = _with_params(state, init_params, trainer)
  # What was logged after that checkpoint (before a kill) is logged again below.
  dropped = workdir_lib.truncate_metrics(workdir, task.name, latest or 0)
  if dropped:
    logging.info("%s: %d lines of %s after step %d dropped (logged after the last checkpoint)",
                 task.name, dropped, workdir_lib.METRICS_JSONL, latest or 0)

  # Made by a jit rather than device_put: every process holds it, also on multi-host meshes.
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=layout.replicated())()
  step = int(jax.device_get(state["step"]))
  evals = prior_eval_records(workdir, step)
  eval_every = s.get("eval_every", 0) if evaluator is not None else 0
  progress.start(task.name, step)
  previous_metrics = None
  def fetch():
    local = progress.next_batch(iterator)  # its wait is the progress line's input wait
    return local, sharding_lib.global_microbatches(local, layout, trainer.accum_steps)

  ahead = fetch()
  while step < s.steps:
    local, batch = ahead
    state, metrics = compiled(state, batch, rng)  # dispatched: runs while the next is fetched
    step += 1
    if step < s.steps:  # the next batch is read and put on the devices during this step
      ahead = fetch()
    preempted = watch.reached(step)  # every process, every step: the same answer on all
    if s.skip_nonfinite and previous_metrics is not None:
      # The previous step's count is ready by now: reading it does not stall the device.
      _check_skipped(task.name, step - 1, int(previous_metrics["skipped_in_row"]), s, mngr)
    previous_metrics = metrics
    save_now = step % s.checkpoint_every == 0 or step == s.steps or preempted
    if step % s.log_every == 0 or save_now:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if s.skip_nonfinite:
        _check_skipped(task.name, step, int(metrics["skipped_in_row"]), s, mngr)
      elif not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f"{task.name}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step "
            f"{step}; nothing after step {mngr.latest_step()} was saved (checkpoints in "
            f"{mngr.directory}). {_remedy(task.name, mngr, skip=True)}")
      writer.write(progress.log_step(step, metrics))  # + images/s, MFU, input wait, ETA
    if draw_images:
      draw_images(state["params"], local, step)
    if save_now:
      checkpointing.save(mngr, step, state, config=config_record, data=dict(
          step=step, global_batch=s.batch_size, examples_seen=step * s.batch_size))
    if preempted:
      mngr.wait_until_finished()
      raise preemption.Preempted(task.name, step, checkpointing.step_dir(mngr, step))
    if eval_every and step % eval_every == 0:
      # Logged as stage "eval" at the fine-tune step: TensorBoard's eval/top1 curve.
      record = dict(stage="eval", step=step)
      for prefix, params in (("", state["params"]), ("ema_", state.get("ema"))):
        if params is not None:
          result = evaluator(params)
          record.update({f"{prefix}top1": result["top1"], f"{prefix}top5": result["top5"]})
      evals.append(record)
      writer.write(record)
      logging.info("%s step %d/%d: eval %s", task.name, step, s.steps, ", ".join(
          f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("top1", "top5"))))
  mngr.wait_until_finished()
  return state, evals


def _check_skipped(stage: str, step: int, in_row: int, s, mngr) -> None:
  if in_row >= s.skip_nonfinite:
    mngr.wait_until_finished()
    raise NonFiniteLossError(
        f"{stage}: {in_row} non-finite steps in a row up to step {step} (limit "
        f"{stage}.skip_nonfinite={s.skip_nonfinite}); the last checkpoint is step "
        f"{mngr.latest_step()} in {mngr.directory}. {_remedy(stage, mngr, skip=False)}")


def _remedy(stage: str, mngr, skip: bool) -> str:
  """What to change after a non-finite loss; a stage with a checkpoint is bound to its config
  (workdir.py), so lr, warmup and clipping then change in a new workdir."""
  where = "" if mngr.latest_step() is None else (
      f" (in a new --workdir: this one resumes {stage} only with its config)")
  also = f", set {stage}.skip_nonfinite (resumable)" if skip else ""
  return (f"Lower {stage}.base_lr, lengthen warmup_steps or set clip_grad{where}{also}, or "
          f"check the input data.")


def _with_params(state, params: Params, trainer: trainer_lib.Trainer):
  """Overlays loaded parameters (a subtree of the model's) onto a fresh state, sharded."""
  merged = _overlay(state["params"], params)
  merged = jax.device_put(merged, trainer.state_shardings["params"])
  state = dict(state, params=merged)
  if "ema" in state:
    state["ema"] = jax.device_put(merged, trainer.state_shardings["ema"])
  return state


def _overlay(base: dict, top: dict) -> dict:
  out = dict(base)
  for key, value in top.items():
    out[key] = _overlay(base[key], value) if isinstance(value, dict) else value
  return out


# ---------------------------------------------------------------------------------------------
# Evaluation: top-1 / top-5 over the whole eval split.
# ---------------------------------------------------------------------------------------------
class Evaluator:
  """Top-1 / top-5 over the whole eval split, compiled once, for any parameters of the
  fine-tune model (the training params, the EMA copy, or loaded weights)."""

  def __init__(self, config, num_classes: int, layout,
               progress: progress_lib.Progress | None = None):
    self.config = config
    self.step = trainer_lib.make_eval_step(config, num_classes, layout)
    self.progress = progress

  def __call__(self, params: Params) -> dict:
    step = self.step
    params = jax.device_put(params, step.param_shardings)
    totals = dict(top1=0.0, top5=0.0, count=0.0)
    eval_iter = data_lib.build_eval_iterator(
        self.config.data, image_size=self.config.finetune.img_size,
        global_batch_size=self.config.eval.batch_size)
    batches = eval_iter if self.progress is None else self.progress.eval_batches(eval_iter)
    with jax.set_mesh(step.layout.mesh):  # per-group weight gathering, as in training
      for local in batches:
        batch = sharding_lib.global_batch(local, step.layout.batch)
        for k, v in jax.device_get(step.counts(params, batch)).items():
          totals[k] += float(v)
    n = max(totals["count"], 1.0)
    return dict(top1=totals["top1"] / n, top5=totals["top5"] / n,
                num_examples=int(totals["count"]))


def evaluate(config, params: Params, num_classes: int, layout) -> dict:
  return Evaluator(config, num_classes, layout)(params)


def best_of(evals: list[dict], final: dict, final_step: int | None, prefix: str = "") -> dict:
  """The best top-1 over the evaluations made while training and the final one."""
  points = [(r[f"{prefix}top1"], r["step"]) for r in evals if f"{prefix}top1" in r]
  if final_step is not None:
    points.append((final["top1"], final_step))
  if not points:
    return {}
  top1, step = max(points, key=lambda p: (p[0], -p[1]))  # the earliest of equals
  return {f"{prefix}best_top1": top1, f"{prefix}best_step": step}


# ---------------------------------------------------------------------------------------------
# The whole job.
# ---------------------------------------------------------------------------------------------
def run(config, workdir: str) -> dict:
  """Runs the configured stages in order; returns the eval result when evaluation ran.

  Every check that can refuse the run comes before its first write into the workdir (see
  workdir.py for what a rerun on the same workdir may change)."""
  config_lib.validate(config)
  layout = trainer_lib.make_layout(config)
  config_lib.check_batches(config, layout.mesh.size)
  stages = ("eval",) if config.eval_only else tuple(config.stages)
  latest = workdir_lib.latest_steps(workdir)
  workdir_lib.check_inputs(config, workdir, stages, latest)
  info = data_lib.dataset_info(config.data)  # builds digits on first use, outside the workdir
  resolved = workdir_lib.config_json(config)
  changes = workdir_lib.check_config(resolved, workdir, latest)
  # Weights from outside the workdir are loaded now, so that one of another size or head is
  # refused (naming the key that fixes it) before anything is written.
  init = None
  if ("finetune" in stages and latest["finetune"] is None
      and config.finetune.init not in ("pretrain", "scratch")):
    init = finetune_init_params(config, workdir, info.num_classes, layout)
  _check_checkpoints_fit(config, workdir, stages, latest, info.num_classes, layout, resolved)
  final = None  # (params, ema, source, step) of the evaluation
  if "eval" in stages and "finetune" not in stages and config.eval_checkpoint:
    final = load_eval_params(config, workdir, info.num_classes, layout)

  # The first write.
  paths.makedirs(workdir)
  workdir_lib.save_config(workdir, resolved)
  for line in changes:
    logging.info("%s", line)
  writer = progress_lib.MetricWriter(workdir)
  progress = progress_lib.Progress(config, info, stages, latest)
  logging.info("data %s: %d classes, %d train / %d eval examples", config.data.name,
               info.num_classes, info.num_train_examples, info.num_eval_examples)
  evaluator = None
  if "eval" in stages or ("finetune" in stages and config.finetune.eval_every):
    evaluator = Evaluator(config, info.num_classes, layout, progress)
  watch = preemption.Watch()
  with watch.installed():
    return _run_stages(config, workdir, stages, latest=latest, info=info, layout=layout,
                       writer=writer, evaluator=evaluator, init=init, final=final, watch=watch,
                       resolved=resolved, progress=progress)


def _check_checkpoints_fit(config, workdir: str, stages, latest, num_classes: int, layout,
                           resolved: dict) -> None:
  """Refuses, before the first write, to resume from a checkpoint of another config."""
  tasks = dict(pretrain=lambda: trainer_lib.simmim_task(config),
               finetune=lambda: trainer_lib.finetune_task(config, num_classes))
  for stage, task in tasks.items():
    if stage in stages and latest.get(stage) is not None:
      shapes = trainer_lib.make_trainer(config, task(), layout, accum_steps=1)
      mngr = checkpointing.manager(workdir_lib.checkpoint_dir(workdir, stage),
                                   keep=config.checkpoint.keep, use_async=False, create=False)
      checkpointing.check_fits(mngr, latest[stage], shapes.abstract_state, resolved)


def _run_stages(config, workdir: str, stages, *, latest, info, layout, writer, evaluator, init,
                final, watch, resolved, progress) -> dict:
  """The stages of `run`, in order, after its checks and first write."""
  evals = []
  for stage in stages:
    progress.begin(stage)  # times the stage, for the end-of-job summary
    done = latest.get(stage) is not None and latest[stage] >= config[stage].steps
    if stage == "pretrain":
      encoder_dir = workdir_lib.encoder_dir(workdir)
      if done and checkpointing.tree_step(encoder_dir) == latest[stage]:
        logging.info("pretrain: complete (checkpoint and encoder at step %d), skipped",
                     latest[stage])
        continue
      state, _ = train_stage(config, workdir, trainer_lib.simmim_task(config), layout, writer,
                             watch=watch, config_record=resolved, progress=progress)
      # The encoder alone, for fine-tuning (a collective save on multi-host).
      checkpointing.save_tree(encoder_dir, state["params"]["encoder"],
                              step=int(state["step"]))
    elif stage == "finetune":
      if done and "eval" not in stages:
        logging.info("finetune: complete (checkpoint at step %d), skipped", latest[stage])
        continue
      # Only a fine-tune that starts (no checkpoint yet) reads its initial weights: loaded
      # above from a file, or now from the encoder that pretraining has just exported.
      if latest[stage] is None and config.finetune.init == "pretrain":
        init = finetune_init_params(config, workdir, info.num_classes, layout)
      task = trainer_lib.finetune_task(config, info.num_classes)
      state, evals = train_stage(config, workdir, task, layout, writer, init_params=init,
                                 evaluator=evaluator, watch=watch, config_record=resolved,
                                 progress=progress)
      step = int(state["step"])
      final = (state["params"], state.get("ema"),
               paths.join(workdir_lib.checkpoint_dir(workdir, "finetune"), str(step)), step)
    elif stage == "eval":
      if final is None:
        final = load_eval_params(config, workdir, info.num_classes, layout)
        if final[3] is not None:
          evals = prior_eval_records(workdir, final[3])
      params, ema, source, step = final
      result = evaluator(params)
      result.update(best_of(evals, result, step))
      if ema is not None:  # the EMA weights, evaluated beside the raw ones
        ema_result = evaluator(ema)
        result.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"],
                      **best_of(evals, ema_result, step, prefix="ema_"))
      result["checkpoint"] = source
      workdir_lib.write_json(paths.join(workdir, "eval.json"), result)
      logging.info("eval: top-1 %.4f top-5 %.4f on %d examples (%s)", result["top1"],
                   result["top5"], result["num_examples"], source)
      progress.finish(workdir, result)
      return result
  progress.finish(workdir)
  return {}
