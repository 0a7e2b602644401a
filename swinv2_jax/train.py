"""The main job: SimMIM pretraining -> supervised fine-tuning -> evaluation.

Functional core: each model is split once into a graphdef and a pure-dict parameter pytree;
the train state {step, params, opt_state[, ema]} is created already sharded by a jitted init
(ZeRO stage from config), and the jitted step maps state -> state with donation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import convert
from swinv2_jax import data as data_lib
from swinv2_jax import optim
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import simmim
from swinv2_jax.models.swinv2 import SwinTransformerV2

Params = Any


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
# Models of each stage.
# ---------------------------------------------------------------------------------------------
def compute_dtype(config):
  return jnp.dtype(config.model.dtype)


def build_classifier(config, stage: str, num_classes: int, seed: int = 0) -> SwinTransformerV2:
  return SwinTransformerV2(**config_lib.model_args(config, stage), num_classes=num_classes,
                           dtype=compute_dtype(config), rngs=seed)


def build_simmim(config, seed: int = 0) -> simmim.SimMIM:
  encoder = SwinTransformerV2(**config_lib.model_args(config, "pretrain"), num_classes=0,
                              dtype=compute_dtype(config), rngs=seed)
  return simmim.SimMIM(encoder, rngs=seed + 1)


def _backbone(model):
  return model.encoder if isinstance(model, simmim.SimMIM) else model


@dataclasses.dataclass
class Task:
  """What differs between the training stages: the model and its loss."""
  name: str
  build: Callable[[int], nnx.Module]
  loss: Callable[..., tuple[jax.Array, dict]]  # (model, batch, rng) -> (loss, aux)
  data_kind: str
  stage_cfg: ml_collections.ConfigDict


def simmim_task(config) -> Task:
  p = config.pretrain

  def loss(model, batch, rng):
    reconstruction = model(batch["image"], batch["mask"], rng=rng)
    return simmim.reconstruction_loss(batch["image"], reconstruction, batch["mask"],
                                      config.model.patch_size, p.norm_target_window), {}

  return Task("pretrain", lambda seed: build_simmim(config, seed), loss, "simmim", p)


def finetune_task(config, num_classes: int) -> Task:
  f, d = config.finetune, config.data

  def loss(model, batch, rng):
    mix_key, depth_key = jax.random.split(rng)
    images, targets = data_lib.mixup_cutmix(
        mix_key, batch["image"], batch["label"], num_classes=num_classes,
        mixup_alpha=float(d.mixup_alpha), cutmix_alpha=float(d.cutmix_alpha),
        prob=float(d.mixup_prob), switch_prob=float(d.mixup_switch_prob),
        label_smoothing=float(d.label_smoothing))
    logits = model(images, rng=depth_key)
    # Soft-target cross-entropy in float32 (timm SoftTargetCrossEntropy).
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)), {}

  return Task("finetune", lambda seed: build_classifier(config, "finetune", num_classes, seed),
              loss, "supervised", f)


# ---------------------------------------------------------------------------------------------
# Sharded train state and the update step.
# ---------------------------------------------------------------------------------------------
def split_params(model) -> tuple[nnx.GraphDef, Params]:
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def scaled_lr(stage_cfg, value: float) -> float:
  """Linear lr scaling by the global batch, per 512 images, as the official recipes."""
  return value * stage_cfg.batch_size / 512


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one training stage."""
  task: Task
  graphdef: nnx.GraphDef
  abstract_state: Any
  state_shardings: Any
  schedule: optax.Schedule
  init: Callable
  step: Callable
  plan: sharding_lib.ShardingPlan
  num_params: int


def make_trainer(config, task: Task, plan: sharding_lib.ShardingPlan) -> Trainer:
  s = task.stage_cfg
  abstract_model = nnx.eval_shape(lambda: task.build(config.seed))
  graphdef, abstract_params = split_params(abstract_model)
  backbone = _backbone(abstract_model)
  schedule = optim.lr_schedule(
      peak_lr=scaled_lr(s, s.base_lr), total_steps=s.steps, warmup_steps=s.warmup_steps,
      warmup_lr=scaled_lr(s, s.warmup_lr), min_lr=scaled_lr(s, s.min_lr))
  tx = optim.make_optimizer(
      abstract_params, schedule=schedule, weight_decay=s.weight_decay, clip_grad=s.clip_grad,
      layer_decay=s.layer_decay, depths=backbone.depths,
      blocks_per_group=[st.blocks_per_group for st in backbone.stages], betas=tuple(s.betas))
  use_ema = task.name == "finetune" and s.ema_decay > 0

  def init():
    _, params = split_params(task.build(config.seed))
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if use_ema:
      state["ema"] = params
    return state

  abstract_state = jax.eval_shape(init)
  state_shardings = dict(step=plan.replicated(), params=plan.params(abstract_state["params"]),
                         opt_state=plan.opt_state(abstract_state["opt_state"]))
  if use_ema:  # the EMA copy is optimizer-like state: sharded from ZeRO stage 1
    state_shardings["ema"] = plan.opt_state(abstract_state["params"])
  grad_shardings = plan.grads(abstract_state["params"])

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])

    def loss_fn(params):
      return task.loss(nnx.merge(graphdef, params), batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    # ZeRO-2/3: gradients live sharded, so XLA reduce-scatters instead of all-reducing.
    grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if use_ema:
      decay = s.ema_decay
      new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                      state["ema"], params)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]),
                   **aux)
    return new_state, metrics

  jit_init = jax.jit(init, out_shardings=state_shardings)
  jit_step = jax.jit(train_step, donate_argnums=0,
                     out_shardings=(state_shardings, plan.replicated()))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  return Trainer(task, graphdef, abstract_state, state_shardings, schedule, jit_init, jit_step,
                 plan, num_params)


def batch_shardings(plan, batch_spec: dict):
  return {k: plan.batch(len(v.shape)) for k, v in batch_spec.items()}


def abstract_batch(config, task: Task, global_batch: int) -> dict:
  """Shapes of one global batch of a stage (for ahead-of-time compilation)."""
  s = task.stage_cfg
  h, w = (s.img_size, s.img_size) if isinstance(s.img_size, int) else tuple(s.img_size)
  batch = dict(image=jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32))
  if task.data_kind == "simmim":
    p = config.model.patch_size
    batch["mask"] = jax.ShapeDtypeStruct((global_batch, h // p, w // p), jnp.int32)
  else:
    batch["label"] = jax.ShapeDtypeStruct((global_batch,), jnp.int32)
  return batch


def lower_step(trainer: Trainer, batch_spec: dict):
  shardings = batch_shardings(trainer.plan, batch_spec)
  state = checkpointing.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  batch = checkpointing.abstract_with_shardings(batch_spec, shardings)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=trainer.plan.replicated())
  with jax.set_mesh(trainer.plan.mesh):  # lets the model gather scanned weights per group
    return trainer.step.lower(state, batch, rng)


def compile_step(trainer: Trainer, batch_spec: dict):
  return lower_step(trainer, batch_spec).compile()


def memory_summary(compiled, trainer: Trainer) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Training loop of one stage (resumable).
# ---------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  pass


def train_stage(config, workdir: str, task: Task, plan, writer: MetricWriter,
                init_params: Params | None = None):
  """Runs (or resumes, or skips when complete) one training stage; returns its final state."""
  s = task.stage_cfg
  stage_dir = os.path.join(workdir, task.name)
  trainer = make_trainer(config, task, plan)
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
  compiled = compile_step(trainer, abstract_batch(config, task, s.batch_size))
  from swinv2_jax import plan as memory_plan  # plan builds on this module
  summary = memory_plan.summarize(trainer, compiled, config, global_batch=s.batch_size,
                                  compile_s=time.perf_counter() - compile_start)
  logging.info("%s: compiled step\n%s", task.name, memory_plan.format_table(summary))
  # Made by a jit rather than device_put: every process holds it, also on multi-host meshes.
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=plan.replicated())()
  step = int(jax.device_get(state["step"]))
  last_log_time, last_log_step = time.time(), step
  while step < s.steps:
    local = next(iterator)
    batch = sharding_lib.global_batch(local, plan.batch)
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


def _with_params(state, params: Params, trainer: Trainer):
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
def evaluate(config, params: Params, num_classes: int, plan) -> dict:
  model = nnx.eval_shape(lambda: build_classifier(config, "eval", num_classes))
  model.eval()
  graphdef, abstract = split_params(model)
  params = jax.device_put(params, plan.params(abstract))

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
    batch = sharding_lib.global_batch(local, plan.batch)
    for k, v in jax.device_get(counts(params, batch)).items():
      totals[k] += float(v)
  n = max(totals["count"], 1.0)
  return dict(top1=totals["top1"] / n, top5=totals["top5"] / n, num_examples=int(totals["count"]))


def load_eval_params(config, workdir: str, num_classes: int, plan) -> tuple[Params, str]:
  """Parameters to evaluate: config.eval_checkpoint, else the workdir's latest fine-tune."""
  path = config.eval_checkpoint
  if path:
    model = build_classifier(config, "eval", num_classes)
    if os.path.isdir(path):
      convert.load_params(path, model)
    else:
      convert.load_pytorch_weights(model, path)
    return split_params(model)[1], path
  task = finetune_task(config, num_classes)
  trainer = make_trainer(config, task, plan)
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
def make_plan(config, devices=None) -> sharding_lib.ShardingPlan:
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape, devices)
  return sharding_lib.ShardingPlan(mesh, zero_stage=config.mesh.zero_stage,
                                   rules=config.mesh.rules)


def finetune_init_params(config, workdir: str, num_classes: int, plan) -> Params | None:
  init = config.finetune.init
  if init == "scratch":
    return None
  if init == "pretrain":
    encoder_dir = os.path.join(workdir, "pretrain", "encoder")
    if not os.path.isdir(encoder_dir):
      raise FileNotFoundError(
          f"finetune.init='pretrain' but {encoder_dir} does not exist: run the pretrain stage "
          f"first, or set finetune.init='scratch' or a checkpoint path")
    abstract = split_params(nnx.eval_shape(lambda: build_classifier(config, "finetune", 0)))[1]
    return checkpointing.load_tree(encoder_dir, abstract, plan.params(abstract))
  model = build_classifier(config, "finetune", num_classes)
  if os.path.isdir(init):
    convert.load_params(init, model)
  else:
    convert.load_pytorch_weights(model, init, drop_head=config.finetune.drop_head)
  return split_params(model)[1]


def run(config, workdir: str) -> dict:
  """Runs the configured stages in order; returns the eval result when evaluation ran."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  plan = make_plan(config)
  writer = MetricWriter(workdir)
  info = data_lib.dataset_info(config.data)
  logging.info("data %s: %d classes, %d train / %d eval examples", config.data.name,
               info.num_classes, info.num_train_examples, info.num_eval_examples)
  stages = ("eval",) if config.eval_only else tuple(config.stages)
  final_params, source = None, None
  for stage in stages:
    if stage == "pretrain":
      state = train_stage(config, workdir, simmim_task(config), plan, writer)
      # The encoder alone, for fine-tuning (a collective save on multi-host).
      checkpointing.save_tree(os.path.join(workdir, "pretrain", "encoder"),
                              state["params"]["encoder"])
    elif stage == "finetune":
      init = finetune_init_params(config, workdir, info.num_classes, plan)
      state = train_stage(config, workdir, finetune_task(config, info.num_classes), plan, writer,
                          init_params=init)
      final_params = state.get("ema", state["params"])
      source = os.path.join(workdir, "finetune", "checkpoints", str(int(state["step"])))
    elif stage == "eval":
      if final_params is None:
        final_params, source = load_eval_params(config, workdir, info.num_classes, plan)
      result = evaluate(config, final_params, info.num_classes, plan)
      result["checkpoint"] = source
      write_json(os.path.join(workdir, "eval.json"), result)
      logging.info("eval: top-1 %.4f top-5 %.4f on %d examples (%s)", result["top1"],
                   result["top5"], result["num_examples"], source)
      return result
  return {}
