"""What a training stage compiles: its task (model and loss), the sharded train state and the
jitted update step. Shared by the training loop (train.py) and the memory plan (plan.py).

Functional core: each model is split once into a graphdef and a pure-dict parameter pytree;
the train state {step, params, opt_state[, ema]} is created already sharded by a jitted init
(ZeRO-0..3 from config.mesh.zero), and the jitted step maps state -> state with donation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import optim
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import simmim
from swinv2_jax.models.swinv2 import SwinTransformerV2

Params = Any


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
  layout: sharding_lib.Layout
  num_params: int
  accum_steps: int


def _add(tree_a, tree_b):
  return jax.tree.map(jnp.add, tree_a, tree_b)


def make_trainer(config, task: Task, layout: sharding_lib.Layout,
                 accum_steps: int | None = None) -> Trainer:
  """The sharded train state and the jitted step of a stage.

  `accum_steps` overrides `<stage>.accum_steps` (the memory plan resolves 'auto' so).
  """
  s = task.stage_cfg
  accum = config_lib.resolve_accum_steps(config, task.name, accum_steps)
  abstract_model = nnx.eval_shape(lambda: task.build(config.seed))
  graphdef, abstract_params = split_params(abstract_model)
  backbone = _backbone(abstract_model)
  schedule = optim.lr_schedule(
      peak_lr=scaled_lr(s, s.base_lr), total_steps=s.steps, warmup_steps=s.warmup_steps,
      warmup_lr=scaled_lr(s, s.warmup_lr), min_lr=scaled_lr(s, s.min_lr))
  tx = optim.make_optimizer(
      abstract_params, schedule=schedule, weight_decay=s.weight_decay, clip_grad=s.clip_grad,
      layer_decay=s.layer_decay, depths=backbone.depths,
      blocks_per_group=[st.blocks_per_group for st in backbone.levels], betas=tuple(s.betas))
  use_ema = task.name == "finetune" and s.ema_decay > 0
  skip_nonfinite = s.skip_nonfinite > 0

  def init():
    _, params = split_params(task.build(config.seed))
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 skipped_in_row=jnp.zeros((), jnp.int32))
    if use_ema:
      state["ema"] = params
    return state

  abstract_state = jax.eval_shape(init)
  params_shape = abstract_state["params"]
  state_shardings = dict(step=layout.replicated(), params=layout.params(params_shape),
                         opt_state=layout.opt_state(abstract_state["opt_state"], params_shape),
                         skipped_in_row=layout.replicated())
  if use_ema:  # the EMA copy is optimizer-like state: sharded from ZeRO-1 on
    state_shardings["ema"] = layout.opt_state(params_shape, params_shape)
  grad_shardings = layout.grads(params_shape)

  def microbatch_grads(params, batch, rng):
    def loss_fn(params):
      return task.loss(nnx.merge(graphdef, params), batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # ZeRO-2/3: gradients live sharded, so XLA reduce-scatters instead of all-reducing, and
    # the accumulated sum below is held as a shard per device, never as a whole buffer.
    grads = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda g: g.astype(jnp.float32), grads), grad_shardings)
    return loss, aux, grads

  def train_step(state, batch, rng):
    """One optimizer update from a global batch laid out as (accum_steps, microbatch, ...)."""
    rng = jax.random.fold_in(rng, state["step"])
    params = state["params"]
    if accum == 1:
      loss, aux, grads = microbatch_grads(
          params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(rng, 0))
    else:
      # Stochastic depth and mixup/cutmix draw per microbatch (a key per microbatch), as timm
      # draws one mixup lambda per rank and batch. Every microbatch has the same size, so the
      # mean of the microbatch means is the mean over the global batch.
      def accumulate(carry, xs):
        index, microbatch = xs
        loss, aux, grads = microbatch_grads(params, microbatch, jax.random.fold_in(rng, index))
        return (carry[0] + loss, _add(carry[1], grads)), aux

      zeros = jax.lax.with_sharding_constraint(
          jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
      (loss, grads), aux = jax.lax.scan(
          accumulate, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), batch))
      loss = loss / accum
      grads = jax.tree.map(lambda g: g / accum, grads)
      aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    if use_ema:
      decay = s.ema_decay
      new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                      state["ema"], new_state["params"])
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]), **aux)
    if skip_nonfinite:
      # A non-finite loss or gradient leaves params, moments and EMA as they were; the step
      # (and so the schedule and the data) moves on. The loop stops after K in a row.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                          {k: new_state[k] for k in ("params", "opt_state", "ema")
                           if k in new_state},
                          {k: state[k] for k in ("params", "opt_state", "ema") if k in state})
      new_state.update(kept)
      new_state["skipped_in_row"] = jnp.where(finite, 0, state["skipped_in_row"] + 1)
      metrics["skipped"] = 1 - finite.astype(jnp.int32)
    metrics["skipped_in_row"] = new_state["skipped_in_row"]
    return new_state, metrics

  jit_init = jax.jit(init, out_shardings=state_shardings)
  jit_step = jax.jit(train_step, donate_argnums=0,
                     out_shardings=(state_shardings, layout.replicated()))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  return Trainer(task, graphdef, abstract_state, state_shardings, schedule, jit_init, jit_step,
                 layout, num_params, accum)


def batch_shardings(layout, batch_spec: dict):
  return {k: layout.microbatches(len(v.shape)) for k, v in batch_spec.items()}


def abstract_batch(config, task: Task, global_batch: int, accum_steps: int = 1) -> dict:
  """Shapes of one global batch of a stage, as the step takes it: (accum_steps, microbatch x
  devices, ...), so that every microbatch is spread over all data-parallel devices."""
  s = task.stage_cfg
  h, w = (s.img_size, s.img_size) if isinstance(s.img_size, int) else tuple(s.img_size)
  lead = (accum_steps, global_batch // accum_steps)
  batch = dict(image=jax.ShapeDtypeStruct(lead + (h, w, 3), jnp.float32))
  if task.data_kind == "simmim":
    p = config.model.patch_size
    batch["mask"] = jax.ShapeDtypeStruct(lead + (h // p, w // p), jnp.int32)
  else:
    batch["label"] = jax.ShapeDtypeStruct(lead, jnp.int32)
  return batch


def trainer_batch(config, trainer: Trainer) -> dict:
  """The abstract global batch of a trainer's stage, at its accumulation."""
  return abstract_batch(config, trainer.task, trainer.task.stage_cfg.batch_size,
                        trainer.accum_steps)


def lower_step(trainer: Trainer, batch_spec: dict):
  shardings = batch_shardings(trainer.layout, batch_spec)
  state = checkpointing.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  batch = checkpointing.abstract_with_shardings(batch_spec, shardings)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=trainer.layout.replicated())
  with jax.set_mesh(trainer.layout.mesh):  # lets the model gather scanned weights per group
    return trainer.step.lower(state, batch, rng)


def compile_step(trainer: Trainer, batch_spec: dict):
  return lower_step(trainer, batch_spec).compile()


@dataclasses.dataclass
class EvalStep:
  """The jitted evaluation of a classifier: top-1/top-5 hit counts of one global batch."""
  abstract_params: Any
  param_shardings: Any
  counts: Callable  # (params, batch {image, label, valid}) -> {top1, top5, count}
  layout: sharding_lib.Layout


# XLA's CPU backend hands matrix products, with the elementwise work and reductions around
# them, to YNNPACK fusions. They pay in the train step (SwinV2-T at batch 8: 13% faster than
# without) but not in a forward alone, which runs 5-16% faster with XLA's own product and loop
# emitters, and steadier (docs/performance.md). So the evaluation compiles without them on CPU.
CPU_EVAL_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def eval_compiler_options(layout: sharding_lib.Layout) -> dict | None:
  cpu = layout.mesh.devices.flat[0].platform == "cpu"
  return dict(CPU_EVAL_COMPILER_OPTIONS) if cpu else None


def make_eval_step(config, num_classes: int, layout: sharding_lib.Layout) -> EvalStep:
  """Evaluation at the fine-tune size, with parameters sharded as in training (ZeRO-3: each
  scanned group's weights are gathered inside the loop, as in the train step)."""
  model = nnx.eval_shape(lambda: build_classifier(config, "eval", num_classes))
  model.eval()
  graphdef, abstract = split_params(model)

  def counts(params, batch):
    logits = nnx.merge(graphdef, params)(batch["image"])
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    hit = top5 == batch["label"][:, None]
    valid = batch["valid"].astype(jnp.float32)
    return dict(top1=jnp.sum(hit[:, 0] * valid), top5=jnp.sum(jnp.any(hit, -1) * valid),
                count=jnp.sum(valid))

  param_shardings = layout.params(abstract)
  jitted = jax.jit(counts, in_shardings=(param_shardings, None),
                   out_shardings=layout.replicated(),
                   compiler_options=eval_compiler_options(layout))
  return EvalStep(abstract, param_shardings, jitted, layout)


def abstract_eval_batch(config) -> dict:
  h, w = config_lib.to_pair(config.finetune.img_size)
  b = config.eval.batch_size
  return dict(image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
              label=jax.ShapeDtypeStruct((b,), jnp.int32),
              valid=jax.ShapeDtypeStruct((b,), jnp.bool_))


def compile_eval_step(config, eval_step: EvalStep):
  layout = eval_step.layout
  params = checkpointing.abstract_with_shardings(eval_step.abstract_params,
                                                 eval_step.param_shardings)
  spec = abstract_eval_batch(config)
  batch = checkpointing.abstract_with_shardings(
      spec, {k: layout.batch(len(v.shape)) for k, v in spec.items()})
  with jax.set_mesh(layout.mesh):
    return eval_step.counts.lower(params, batch).compile()


def make_layout(config, devices=None) -> sharding_lib.Layout:
  mesh = sharding_lib.make_mesh(config.mesh.axes, config.mesh.shape, devices)
  return sharding_lib.Layout(mesh, zero=config.mesh.zero, rules=config.mesh.rules)
