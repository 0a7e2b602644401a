"""The main job: SimMIM pretraining -> supervised fine-tuning -> evaluation.

The training loop of a stage (resumable), evaluation and the outputs of a run; what a stage
compiles (task, sharded state, step) is in trainer.py.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import convert
from swinv2_jax import data as data_lib
from swinv2_jax import plan as plan_lib
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import trainer as trainer_lib

Params = trainer_lib.Params


# ---------------------------------------------------------------------------------------------
# Outputs: metrics.jsonl, TensorBoard, eval.json.
# ---------------------------------------------------------------------------------------------
class MetricWriter:
  """One JSON object per logged step in metrics.jsonl and TensorBoard scalars (process 0)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("stage", "step") and isinstance(value, (int, float)):
        self.tb.add_scalar(f"{record['stage']}/{key}", value, record["step"])
    self.tb.flush()


def write_json(path: str, obj) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------------
# Training loop of one stage (resumable).
# ---------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  pass


def train_stage(config, workdir: str, task: trainer_lib.Task, layout, writer: MetricWriter,
                init_params: Params | None = None):
  """Runs (or resumes, or skips when complete) one training stage; returns its final state."""
  s = task.stage_cfg
  stage_dir = os.path.join(workdir, task.name)
  trainer = trainer_lib.make_trainer(config, task, layout)
  mngr = checkpointing.manager(os.path.join(stage_dir, "checkpoints"),
                               keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
  latest = mngr.latest_step()
  if latest is not None and latest >= s.steps:
    logging.info("%s: complete (checkpoint at step %d), skipped", task.name, latest)
    return checkpointing.restore(mngr, latest, trainer.abstract_state, trainer.state_shardings)

  mask_cfg = dict(mask_patch_size=config.pretrain.mask_patch_size,
                  model_patch_size=config.model.patch_size,
                  mask_ratio=config.pretrain.mask_ratio)
  iterator = data_lib.build_train_iterator(
      config.data, kind=task.data_kind, image_size=s.img_size, global_batch_size=s.batch_size,
      seed=config.seed, mask_cfg=mask_cfg if task.data_kind == "simmim" else None)
  if latest is not None:
    state = checkpointing.restore(mngr, latest, trainer.abstract_state, trainer.state_shardings,
                                  iterator)
    logging.info("%s: resumed from step %d", task.name, latest)
  else:
    state = trainer.init()
    if init_params is not None:
      state = _with_params(state, init_params, trainer)

  compile_start = time.perf_counter()
  batch_spec = trainer_lib.abstract_batch(config, task, s.batch_size)
  compiled = trainer_lib.compile_step(trainer, batch_spec)
  summary = plan_lib.summarize(trainer, compiled, config, global_batch=s.batch_size,
                                  compile_s=time.perf_counter() - compile_start)
  logging.info("%s: compiled step\n%s", task.name, plan_lib.format_table(summary))
  # Made by a jit rather than device_put: every process holds it, also on multi-host meshes.
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=layout.replicated())()
  step = int(jax.device_get(state["step"]))
  last_log_time, last_log_step = time.time(), step
  while step < s.steps:
    local = next(iterator)
    batch = sharding_lib.global_batch(local, layout.batch)
    state, metrics = compiled(state, batch, rng)
    step += 1
    save_now = step % s.checkpoint_every == 0 or step == s.steps
    if step % s.log_every == 0 or save_now:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f"{task.name}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step "
            f"{step}; nothing after step {mngr.latest_step()} was saved (checkpoints in "
            f"{mngr.directory}). Lower {task.name}.base_lr, lengthen warmup_steps or set "
            f"clip_grad, or check the input data.")
      now = time.time()
      images_per_s = (step - last_log_step) * s.batch_size / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      writer.write(dict(stage=task.name, step=step, **metrics, images_per_s=images_per_s))
      logging.info("%s step %d/%d: loss %.4f lr %.3g grad norm %.3g, %.1f images/s",
                   task.name, step, s.steps, metrics["loss"], metrics["lr"],
                   metrics["grad_norm"], images_per_s)
    if save_now:
      checkpointing.save(mngr, step, state, iterator)
  mngr.wait_until_finished()
  return state


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
def evaluate(config, params: Params, num_classes: int, layout) -> dict:
  model = nnx.eval_shape(lambda: trainer_lib.build_classifier(config, "eval", num_classes))
  model.eval()
  graphdef, abstract = trainer_lib.split_params(model)
  params = jax.device_put(params, layout.params(abstract))

  @jax.jit
  def counts(params, batch):
    logits = nnx.merge(graphdef, params)(batch["image"])
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    hit = top5 == batch["label"][:, None]
    valid = batch["valid"].astype(jnp.float32)
    return dict(top1=jnp.sum(hit[:, 0] * valid), top5=jnp.sum(jnp.any(hit, -1) * valid),
                count=jnp.sum(valid))

  totals = dict(top1=0.0, top5=0.0, count=0.0)
  eval_iter = data_lib.build_eval_iterator(config.data, image_size=config.finetune.img_size,
                                           global_batch_size=config.eval.batch_size)
  for local in eval_iter:
    batch = sharding_lib.global_batch(local, layout.batch)
    for k, v in jax.device_get(counts(params, batch)).items():
      totals[k] += float(v)
  n = max(totals["count"], 1.0)
  return dict(top1=totals["top1"] / n, top5=totals["top5"] / n, num_examples=int(totals["count"]))


def load_eval_params(config, workdir: str, num_classes: int, layout) -> tuple[Params, str]:
  """Parameters to evaluate: config.eval_checkpoint, else the workdir's latest fine-tune."""
  path = config.eval_checkpoint
  if path:
    model = trainer_lib.build_classifier(config, "eval", num_classes)
    if os.path.isdir(path):
      convert.load_params(path, model)
    else:
      convert.load_pytorch_weights(model, path)
    return trainer_lib.split_params(model)[1], path
  task = trainer_lib.finetune_task(config, num_classes)
  trainer = trainer_lib.make_trainer(config, task, layout)
  ckpt_dir = os.path.join(workdir, "finetune", "checkpoints")
  mngr = checkpointing.manager(ckpt_dir, keep=config.checkpoint.keep, use_async=False)
  latest = mngr.latest_step()
  if latest is None:
    raise FileNotFoundError(
        f"no fine-tuning checkpoint in {ckpt_dir} to evaluate: run the finetune stage first "
        f"or set config.eval_checkpoint to a checkpoint path")
  state = checkpointing.restore(mngr, latest, trainer.abstract_state, trainer.state_shardings)
  return state.get("ema", state["params"]), os.path.join(ckpt_dir, str(latest))


# ---------------------------------------------------------------------------------------------
# The whole job.
# ---------------------------------------------------------------------------------------------
def finetune_init_params(config, workdir: str, num_classes: int, layout) -> Params | None:
  init = config.finetune.init
  if init == "scratch":
    return None
  if init == "pretrain":
    encoder_dir = os.path.join(workdir, "pretrain", "encoder")
    if not os.path.isdir(encoder_dir):
      raise FileNotFoundError(
          f"finetune.init='pretrain' but {encoder_dir} does not exist: run the pretrain stage "
          f"first, or set finetune.init='scratch' or a checkpoint path")
    encoder = nnx.eval_shape(lambda: trainer_lib.build_classifier(config, "finetune", 0))
    abstract = trainer_lib.split_params(encoder)[1]
    return checkpointing.load_tree(encoder_dir, abstract, layout.params(abstract))
  model = trainer_lib.build_classifier(config, "finetune", num_classes)
  if os.path.isdir(init):
    convert.load_params(init, model)
  else:
    convert.load_pytorch_weights(model, init, drop_head=config.finetune.drop_head)
  return trainer_lib.split_params(model)[1]


def run(config, workdir: str) -> dict:
  """Runs the configured stages in order; returns the eval result when evaluation ran."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  layout = trainer_lib.make_layout(config)
  writer = MetricWriter(workdir)
  info = data_lib.dataset_info(config.data)
  logging.info("data %s: %d classes, %d train / %d eval examples", config.data.name,
               info.num_classes, info.num_train_examples, info.num_eval_examples)
  stages = ("eval",) if config.eval_only else tuple(config.stages)
  final_params, source = None, None
  for stage in stages:
    if stage == "pretrain":
      state = train_stage(config, workdir, trainer_lib.simmim_task(config), layout, writer)
      # The encoder alone, for fine-tuning (a collective save on multi-host).
      checkpointing.save_tree(os.path.join(workdir, "pretrain", "encoder"),
                              state["params"]["encoder"])
    elif stage == "finetune":
      init = finetune_init_params(config, workdir, info.num_classes, layout)
      task = trainer_lib.finetune_task(config, info.num_classes)
      state = train_stage(config, workdir, task, layout, writer,
                          init_params=init)
      final_params = state.get("ema", state["params"])
      source = os.path.join(workdir, "finetune", "checkpoints", str(int(state["step"])))
    elif stage == "eval":
      if final_params is None:
        final_params, source = load_eval_params(config, workdir, info.num_classes, layout)
      result = evaluate(config, final_params, info.num_classes, layout)
      result["checkpoint"] = source
      write_json(os.path.join(workdir, "eval.json"), result)
      logging.info("eval: top-1 %.4f top-5 %.4f on %d examples (%s)", result["top1"],
                   result["top5"], result["num_examples"], source)
      return result
  return {}
