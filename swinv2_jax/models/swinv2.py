"""The Swin Transformer V2 backbone and classifier (Liu et al., CVPR 2022).

Layout follows the official code: a patch embedding, four levels of blocks (the paper's
"stages" 1-4, `levels[0..3]` here: in this codebase a "stage" is a training stage, pretrain /
finetune / eval), a PatchMerging at the end of levels 0..2, a final LayerNorm, average pooling
and a linear head.

Inside a level the blocks are stored stacked, in groups that repeat exactly (a plain block
followed by a shifted one; for H/G six blocks and the extra norm of paper section 3.6), and
run with `jax.lax.scan`, so compile time and program size stay flat with depth.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swinv2_jax.models import layers
from swinv2_jax.models import windows as win

Dtype = Any

# Rematerialisation policies by name (jax.checkpoint_policies); None = keep all activations.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Levels of at most this many block groups, without remat, are unrolled instead of scanned:
# for so few iterations the scan's stacking of residuals and slicing of parameters costs more
# step time (SwinV2-T train step, batch 8, on a CPU: 2.83 s looped, 2.06 s unrolled) than the
# compile time it saves (docs/performance.md). With remat the loop stays: unrolled, the
# compiled step held far more activations (G-1536 fine-tune: 39-43 GiB per device unrolled,
# 31 looped).
UNROLLED_GROUPS = 3


def per_level(value, num_levels: int, name: str) -> list:
  """Broadcasts a scalar setting (or a sequence of one, as a command-line override of a tuple
  setting gives) to every level, or checks a per-level sequence's length."""
  if isinstance(value, (str, int, float, np.integer)):
    return [value] * num_levels
  value = list(value)
  if len(value) == 1:
    return value * num_levels
  if len(value) != num_levels:
    raise ValueError(f"{name} needs one value per level ({num_levels}), got {value}")
  return value


class BlockGroup(nnx.Module):
  """`size` consecutive blocks, plain then shifted alternately, and an optional extra norm."""

  def __init__(self, size: int, *, extra_norm: bool, dim: int, window: win.Pair,
               dtype: Dtype, rngs: nnx.Rngs, **block_kwargs):
    shift = (window[0] // 2, window[1] // 2)
    self.blocks = nnx.List([
        layers.SwinV2Block(dim, window=window, shift=shift if j % 2 else (0, 0),
                           dtype=dtype, rngs=rngs, **block_kwargs)
        for j in range(size)
    ])
    # Paper 3.6: H and G add a LayerNorm on the main branch every 6 blocks.
    self.extra_norm = layers.LayerNorm(dim, dtype=dtype) if extra_norm else None

  def __call__(self, x, drop_rates, key):
    keys = [None] * len(self.blocks) if key is None else jax.random.split(key, len(self.blocks))
    for j, block in enumerate(self.blocks):
      x = block(x, drop_rates[j], keys[j])
    if self.extra_norm is not None:
      x = self.extra_norm(x)
    return x


def _gathered(params):
  """Under a mesh (jax.set_mesh), replicates a group's parameters inside the scan body: with
  ZeRO-3 the partitioner then all-gathers one group's weights per step instead of the
  batch-sharded activations, which at 1536 px are far larger. No-op without a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return params
  return jax.lax.with_sharding_constraint(params, jax.sharding.PartitionSpec())


def _checkpointed(fn, remat: str, in_scan: bool = False):
  policy = REMAT_POLICIES[remat]
  if remat == "none":
    return fn
  # Inside a scan the loop already keeps XLA from merging the recomputation with the forward.
  return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)


class SwinV2Level(nnx.Module):
  """One level: `depth` blocks at one resolution, then (levels 0..2) a PatchMerging."""

  def __init__(self, dim: int, depth: int, num_heads: int, feat_size: win.Pair,
               window: win.Pair, pretrained_window: win.Pair, *, drop_path_rates: Sequence[float],
               downsample: bool, extra_norm_period: int, mlp_ratio: float,
               attention_chunks: int, attention_impl: str, remat: str, dtype: Dtype,
               rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    self.remat = remat
    period = extra_norm_period
    group_size = period if period and depth >= period else 2
    num_groups = depth // group_size
    tail_size = depth - num_groups * group_size
    group_kwargs = dict(dim=dim, num_heads=num_heads, feat_size=feat_size, window=window,
                        pretrained_window=pretrained_window, mlp_ratio=mlp_ratio,
                        attention_chunks=attention_chunks, attention_impl=attention_impl,
                        dtype=dtype)
    # Static tuples (not arrays) so they stay out of the state pytree.
    rates = [float(r) for r in drop_path_rates]
    self.num_groups, self.blocks_per_group = num_groups, group_size
    self.group_drop_rates = tuple(tuple(rates[g * group_size:(g + 1) * group_size])
                                  for g in range(num_groups))
    self.tail_drop_rates = tuple(rates[num_groups * group_size:])
    make_groups = nnx.vmap(
        lambda key: BlockGroup(group_size, extra_norm=bool(period) and group_size == period,
                               rngs=nnx.Rngs(params=key), **group_kwargs),
        in_axes=0, out_axes=0)
    self.groups = make_groups(jax.random.split(rngs.params(), num_groups)) if num_groups else None
    self.tail = (BlockGroup(tail_size, extra_norm=False, rngs=rngs, **group_kwargs)
                 if tail_size else None)
    self.downsample = layers.PatchMerging(dim, dtype=dtype, rngs=rngs) if downsample else None

  def run_blocks(self, x, key=None):
    groups_key, tail_key = (None, None) if key is None else jax.random.split(key)
    if self.groups is not None:
      graphdef, state = nnx.split(self.groups)
      keys = None if groups_key is None else jax.random.split(groups_key, self.num_groups)

      def group_step(carry, xs):
        group_state, rates, group_key = xs
        return nnx.merge(graphdef, _gathered(group_state))(carry, rates, group_key), None

      unroll = self.num_groups <= UNROLLED_GROUPS and self.remat == "none"
      x, _ = jax.lax.scan(_checkpointed(group_step, self.remat, in_scan=True), x,
                          (state, jnp.asarray(self.group_drop_rates, jnp.float32), keys),
                          unroll=unroll)
    if self.tail is not None:
      graphdef, state = nnx.split(self.tail)
      tail_rates = jnp.asarray(self.tail_drop_rates, jnp.float32)

      def tail_step(tail_state, x, tail_key):
        return nnx.merge(graphdef, _gathered(tail_state))(x, tail_rates, tail_key)

      x = _checkpointed(tail_step, self.remat)(state, x, tail_key)
    return x


class SwinTransformerV2(nnx.Module):
  """Swin Transformer V2 classifier over NHWC float images.

  Per-level settings (`window_size`, `pretrained_window_sizes`, `attention_chunks`, `remat`)
  take one value for all levels or one per level; a window may be an int or an (h, w) pair.
  `pretrained_window_sizes` of 0 means "normalise the position table by this window".
  `attention_impl` ('xla', 'cudnn', 'auto'; layers.ATTENTION_IMPLS) picks the attention of
  unshifted blocks.
  """

  def __init__(self, *, img_size: int | Sequence[int] = 256, patch_size: int = 4,
               in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
               depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
               window_size=8, pretrained_window_sizes=0, mlp_ratio: float = 4.0,
               drop_path_rate: float = 0.1, extra_norm_period: int = 0, attention_chunks=1,
               attention_impl: str = "xla", remat="none", dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs | int = 0):
    if isinstance(rngs, int):
      rngs = nnx.Rngs(params=rngs)
    if len(depths) != len(num_heads):
      raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
    if extra_norm_period % 2:
      raise ValueError(f"extra_norm_period must be even (0 disables), got {extra_norm_period}")
    num_levels = len(depths)
    self.img_size = win.to_pair(img_size)
    self.patch_size = patch_size
    self.num_classes = num_classes
    self.depths = tuple(int(d) for d in depths)
    self.dtype = dtype
    self.drop_path_rate = float(drop_path_rate)
    self.deterministic = False
    windows = self._level_windows(window_size, num_levels)
    pretrained = [win.to_pair(w) for w in per_level(pretrained_window_sizes, num_levels,
                                                     "pretrained_window_sizes")]
    chunks = per_level(attention_chunks, num_levels, "attention_chunks")
    remats = per_level(remat, num_levels, "remat")
    feat_sizes = win.level_feature_sizes(self.img_size, patch_size, num_levels)
    win.check_input_size(self.img_size, patch_size, windows)
    self.level_windows = tuple(windows)

    self.patch_embed = layers.PatchEmbed(patch_size, in_chans, embed_dim, dtype=dtype, rngs=rngs)
    # Stochastic depth: linspace(0, rate, all blocks), as the official code.
    rates = np.linspace(0.0, drop_path_rate, sum(self.depths))
    levels = []
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      levels.append(SwinV2Level(
          embed_dim * 2**i, depth, num_heads[i], feat_sizes[i], windows[i], pretrained[i],
          drop_path_rates=rates[start:start + depth], downsample=i < num_levels - 1,
          extra_norm_period=extra_norm_period, mlp_ratio=mlp_ratio,
          attention_chunks=int(chunks[i]), attention_impl=attention_impl, remat=str(remats[i]),
          dtype=dtype, rngs=rngs))
    self.levels = nnx.List(levels)
    self.num_features = embed_dim * 2**(num_levels - 1)
    self.norm = layers.LayerNorm(self.num_features, dtype=dtype)
    self.head = (layers.dense(self.num_features, num_classes, dtype=dtype, rngs=rngs)
                 if num_classes > 0 else None)

  @staticmethod
  def _level_windows(window_size, num_levels: int) -> list[win.Pair]:
    """A window setting: int, (h, w) pair for all levels, or one int/pair per level."""
    if isinstance(window_size, int):
      return [win.to_pair(window_size)] * num_levels
    window_size = list(window_size)
    if len(window_size) == num_levels:
      return [win.to_pair(w) for w in window_size]
    if len(window_size) == 2 and all(isinstance(w, int) for w in window_size):
      return [win.to_pair(window_size)] * num_levels
    raise ValueError(f"window_size must be an int, an (h, w) pair or one per level "
                     f"({num_levels}), got {window_size}")

  def _level_keys(self, rng):
    if rng is None or self.deterministic or self.drop_path_rate == 0.0:
      return [None] * len(self.levels)
    return list(jax.random.split(rng, len(self.levels)))

  def _check_input(self, x):
    if x.ndim != 4 or tuple(x.shape[1:3]) != self.img_size:
      raise ValueError(f"expected NHWC images of size {self.img_size}, got shape {x.shape}; "
                       f"build the model with img_size={tuple(x.shape[1:3])} to run at that size")

  def level_features(self, x, *, rng=None, token_mask=None, mask_token=None):
    """Per-level maps [(B, H/4, W/4, C), (B, H/8, W/8, 2C), ...]: each level's block output
    before its PatchMerging; the last one is followed by `norm` in `features`.

    `token_mask` (B, H/4, W/4) in {0, 1} replaces masked tokens by `mask_token` (SimMIM).
    `rng` drives stochastic depth in training mode; after `model.eval()` it is ignored.
    """
    self._check_input(x)
    x = self.patch_embed(x.astype(self.dtype))
    if token_mask is not None:
      weight = token_mask[..., None].astype(x.dtype)
      x = x * (1 - weight) + mask_token.astype(x.dtype) * weight
    maps = []
    for level, key in zip(self.levels, self._level_keys(rng)):
      x = level.run_blocks(x, key)
      maps.append(x)
      if level.downsample is not None:
        x = level.downsample(x)
    return maps

  def features(self, x, *, rng=None):
    """Final pooled features (B, num_features), after the last LayerNorm."""
    return self.norm(self.level_features(x, rng=rng)[-1]).mean(axis=(1, 2))

  def __call__(self, x, *, rng=None):
    """Logits (B, num_classes) in float32 (pooled features when num_classes == 0)."""
    pooled = self.features(x, rng=rng)
    if self.head is None:
      return pooled.astype(jnp.float32)
    return self.head(pooled).astype(jnp.float32)
