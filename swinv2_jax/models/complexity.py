"""Analytic size of a Swin V2 model: parameters (abstractly, nothing allocated) and
multiply-accumulates per image.

The MAC count follows the official `flops()` methods, whose "FLOPs" column counts MACs and
leaves out the CPB meta MLP, softmax and GELU: T/w8/256 gives 5.9G, B/w16/256 21.8G.
"""

from __future__ import annotations

import jax
from flax import nnx

from swinv2_jax.models import presets
from swinv2_jax.models import swinv2
from swinv2_jax.models import windows as win


def _model_args(name_or_args: str | dict, overrides: dict) -> dict:
  if isinstance(name_or_args, str):
    if name_or_args not in presets.PRESETS:
      raise ValueError(f"unknown model {name_or_args!r}")
    return {**presets.PRESETS[name_or_args], **overrides}
  return {**name_or_args, **overrides}


def count_params(name_or_args: str | dict, **overrides) -> int:
  """Number of parameters, computed with `nnx.eval_shape` (no memory is allocated)."""
  args = _model_args(name_or_args, overrides)
  model = nnx.eval_shape(lambda: swinv2.SwinTransformerV2(**args))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _attention_macs(tokens: int, dim: int, num_heads: int) -> int:
  head_dim = dim // num_heads
  return (tokens * dim * 3 * dim                       # qkv
          + 2 * num_heads * tokens * tokens * head_dim  # q @ k^T and attn @ v
          + tokens * dim * dim)                         # proj


def count_macs(name_or_args: str | dict, **overrides) -> int:
  """Multiply-accumulates of one forward pass on one image (the official "FLOPs")."""
  defaults = dict(img_size=256, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                  window_size=8, mlp_ratio=4.0)
  args = {**defaults, **_model_args(name_or_args, overrides)}
  img = win.to_pair(args["img_size"])
  patch, dim, depths = args["patch_size"], args["embed_dim"], args["depths"]
  windows = swinv2.SwinTransformerV2._level_windows(args["window_size"], len(depths))
  feat_sizes = win.level_feature_sizes(img, patch, len(depths))
  h0, w0 = feat_sizes[0]
  macs = h0 * w0 * dim * args["in_chans"] * patch * patch + h0 * w0 * dim  # stem conv + norm
  for i, depth in enumerate(depths):
    (h, w), level_dim = feat_sizes[i], dim * 2**i
    window, _ = win.clamp_window((h, w), windows[i], (0, 0))
    tokens = window[0] * window[1]
    num_windows = (h // window[0]) * (w // window[1])
    block = (2 * level_dim * h * w  # norm1, norm2
             + num_windows * _attention_macs(tokens, level_dim, args["num_heads"][i])
             + int(2 * h * w * level_dim * level_dim * args["mlp_ratio"]))
    macs += depth * block
    if i < len(depths) - 1:  # PatchMerging: reduction + norm, as the official count
      macs += (h // 2) * (w // 2) * 4 * level_dim * 2 * level_dim + h * w * level_dim // 2
  features = dim * 2**(len(depths) - 1)
  h_last, w_last = feat_sizes[-1]
  macs += features * h_last * w_last + features * args["num_classes"]
  return int(macs)
