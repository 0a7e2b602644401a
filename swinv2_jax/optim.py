"""AdamW with layer-wise lr decay, the warmup + cosine schedule, and the weight-decay exemptions
of the official Swin / SimMIM recipes (docs/design.md, "The recipes and their sources";
official `optimizer.py` and `lr_scheduler.py`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any

# No weight decay on these (official no_weight_decay_keywords plus 1-D params and biases).
_NO_DECAY_NAMES = ("bias", "scale", "q_bias", "v_bias", "logit_scale", "mask_token")


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def decays_weight(names: Sequence[str]) -> bool:
  """Weight decay applies to kernels only, and never to the CPB meta MLP (official list).

  The official SimMIM pretraining missed cpb_mlp / logit_scale because of an `encoder.`
  prefix (issue #369); matching on the leaf and module names here gets it right.
  """
  return names[-1] not in _NO_DECAY_NAMES and "cpb_mlp" not in names


def weight_decay_mask(params: Params) -> Params:
  return jax.tree_util.tree_map_with_path(lambda p, _: decays_weight(_path_names(p)), params)


def layer_ids(params: Params, depths: Sequence[int], blocks_per_group: Sequence[int]) -> Params:
  """Official layer ids (SimMIM `get_swin_layer_id`) for every parameter.

  mask_token, patch_embed -> 0; block k of the whole network -> k + 1; the PatchMerging of
  level s -> sum(depths[:s+1]); everything else (final norm, head, decoder) -> sum(depths)+1.
  Stacked block parameters get one id per group along their leading axis (an int array).
  """
  total = sum(depths)

  def leaf_id(path, leaf):
    names = _path_names(path)
    if "encoder" in names:
      names = names[names.index("encoder") + 1:]
    if names[0] in ("mask_token", "patch_embed"):
      return np.int32(0)
    if names[0] == "levels":
      level = int(names[1])
      first = sum(depths[:level])
      if names[2] == "downsample":
        return np.int32(sum(depths[:level + 1]))
      size = blocks_per_group[level]
      if names[2] == "groups":
        num_groups = leaf.shape[0]
        if names[3] == "extra_norm":  # follows the last block of its group
          return (first + np.arange(num_groups) * size + size).astype(np.int32)
        j = int(names[4])
        return (first + np.arange(num_groups) * size + j + 1).astype(np.int32)
      if names[2] == "tail":
        num_grouped = depths[level] - depths[level] % size if size else 0
        return np.int32(first + num_grouped + int(names[4]) + 1)
    return np.int32(total + 1)

  return jax.tree_util.tree_map_with_path(leaf_id, params)


def layer_scales(params: Params, depths: Sequence[int], blocks_per_group: Sequence[int],
                 decay: float) -> Params:
  """decay ** (sum(depths) + 1 - id), broadcastable against each parameter."""
  total = sum(depths)

  def scale(ids, leaf):
    s = np.power(decay, total + 1 - np.asarray(ids, np.float64)).astype(np.float32)
    return s.reshape(s.shape + (1,) * (leaf.ndim - s.ndim))

  return jax.tree.map(scale, layer_ids(params, depths, blocks_per_group), params)


def scale_by_tree(scales: Params) -> optax.GradientTransformation:
  """Multiplies each update by its (broadcast) per-parameter scale: layer-wise lr decay."""

  def init(_):
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(init, update)


def lr_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float,
                min_lr: float) -> optax.Schedule:
  """Linear warmup from warmup_lr to peak_lr, then cosine to min_lr, per step (as timm's
  CosineLRScheduler with t_in_epochs=False in the official code)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=warmup_lr, peak_value=peak_lr, warmup_steps=max(warmup_steps, 0),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def make_optimizer(params: Params, *, schedule: optax.Schedule, weight_decay: float,
                   clip_grad: float, layer_decay: float, depths: Sequence[int],
                   blocks_per_group: Sequence[int], betas=(0.9, 0.999),
                   eps: float = 1e-8) -> optax.GradientTransformation:
  parts = []
  if clip_grad > 0:
    parts.append(optax.clip_by_global_norm(clip_grad))
  parts.append(optax.adamw(schedule, b1=betas[0], b2=betas[1], eps=eps,
                           weight_decay=weight_decay, mask=weight_decay_mask(params)))
  if layer_decay != 1.0:
    parts.append(scale_by_tree(layer_scales(params, depths, blocks_per_group, layer_decay)))
  return optax.chain(*parts)
