"""Static window geometry of Swin V2: window clamping, position tables and shift masks.

Everything here is computed from Python ints, so none of it lives in the model state (the
official checkpoints' buffers are recomputed, never loaded). Small tables are numpy constants;
the (N, N) and (nW, N, N) ones are built in the graph from O(N) or O(nW x N) inputs, so no
quadratic constant is baked into the program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

Pair = tuple[int, int]

# Logits between tokens of different shifted regions get this bias: -100 as in the official
# code (not -inf), so a fully masked row still has a finite softmax.
SHIFT_MASK_VALUE = -100.0


def to_pair(value: int | Sequence[int]) -> Pair:
  if isinstance(value, (int, np.integer)):
    return (int(value), int(value))
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"expected an int or a pair of ints, got {value}")
  return value  # type: ignore[return-value]


def clamp_window(feat_size: Pair, window: Pair, shift: Pair) -> tuple[Pair, Pair]:
  """Per-axis window and shift for a feature map (timm's rule; the official one for squares).

  Along an axis whose resolution is not larger than the window, the window shrinks to the
  resolution and that axis is not shifted.
  """
  win = tuple(r if r <= w else w for r, w in zip(feat_size, window))
  sft = tuple(0 if r <= w else s for r, w, s in zip(feat_size, win, shift))
  return win, sft  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def relative_coords_table(window: Pair, pretrained_window: Pair) -> np.ndarray:
  """The log-spaced relative coordinates fed to the CPB meta MLP, shape (2Wh-1, 2Ww-1, 2).

  Coordinates are normalised by (pretrained_window - 1) when a pretrained window is given
  (that is what lets a bias learnt at one window transfer to another), else by
  (window - 1), scaled to [-8, 8], then sign(x) * log2(1 + |x|) / log2(8) as in the
  official code (the paper's formula uses the natural log and no normalisation).
  """
  axes = []
  for w, pw in zip(window, pretrained_window):
    coords = np.arange(-(w - 1), w, dtype=np.float32)
    denominator = (pw - 1) if pw > 0 else (w - 1)
    axes.append(coords / max(denominator, 1))
  table = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) * 8.0
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)
  return table.astype(np.float32)


def relative_position_index(window: Pair):
  """Swin V1 index into the flattened (2Wh-1)*(2Ww-1) table for every token pair: (N, N).

  Built in the graph from the N token coordinates: as a constant it would be N^2 int32
  (4 MiB per 32x32 window) baked into the program.
  """
  wh, ww = window
  token = jnp.arange(wh * ww, dtype=jnp.int32)
  row, col = token // ww, token % ww
  rel_row = row[:, None] - row[None, :] + (wh - 1)
  rel_col = col[:, None] - col[None, :] + (ww - 1)
  return rel_row * (2 * ww - 1) + rel_col


def partition_windows(x, window: Pair):
  """(B, H, W, C) -> (B, nW, Wh*Ww, C), windows in row-major order."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def merge_windows(windows, window: Pair, feat_size: Pair):
  """Inverse of `partition_windows`: (B, nW, Wh*Ww, C) -> (B, H, W, C)."""
  b, _, _, c = windows.shape
  (h, w), (wh, ww) = feat_size, window
  x = windows.reshape(b, h // wh, w // ww, wh, ww, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=None)
def shift_region_ids(feat_size: Pair, window: Pair, shift: Pair) -> np.ndarray | None:
  """Region of every token of every window after the cyclic shift: (nW, N) int8, or None.

  After the shift each axis has up to three regions, [0, r-w), [r-w, r-s), [r-s, r) (the
  official slices (0,-w), (-w,-s), (-s,None)); tokens attend only within their region. Only
  these O(nW x N) ids are a constant; `shift_attention_mask` expands them in the graph.
  """
  if not any(shift):
    return None
  region_ids = []
  for r, w, s in zip(feat_size, window, shift):
    ids = np.zeros(r, np.int8)
    if s > 0:
      ids[r - w:r - s] = 1
      ids[r - s:] = 2
    region_ids.append(ids)
  regions = region_ids[0][:, None] * 3 + region_ids[1][None, :]
  return np.ascontiguousarray(partition_windows(regions[None, :, :, None], window)[0, :, :, 0])


def shift_attention_mask(region_ids):
  """Additive mask (..., N, N) from region ids (..., N): -100 between different regions.

  Computed in the graph, where XLA fuses it into the logits: as a constant the (nW, N, N)
  float32 mask of SwinV2-G at 1536 px would be 576 MiB in level 1 alone.
  """
  ids = jnp.asarray(region_ids)
  different = ids[..., :, None] != ids[..., None, :]
  return jnp.where(different, SHIFT_MASK_VALUE, 0.0).astype(jnp.float32)


def level_feature_sizes(img_size: Pair, patch_size: int, num_levels: int) -> list[Pair]:
  h, w = img_size[0] // patch_size, img_size[1] // patch_size
  return [(h // 2**i, w // 2**i) for i in range(num_levels)]


def _axis_fits(size: int, patch_size: int, windows: Sequence[int]) -> bool:
  """Whether one image side gives whole patches, even merges and whole windows in every level."""
  if size % patch_size:
    return False
  r = size // patch_size
  for i, w in enumerate(windows):
    if i > 0:
      if r % 2:
        return False
      r //= 2
    if r > w and r % w:
      return False
  return r > 0


def check_input_size(img_size: Pair, patch_size: int, windows: Sequence[Pair]) -> None:
  """Raises a ValueError naming sizes that would work when `img_size` does not fit the grid."""
  problems = []
  for axis, name in enumerate(("height", "width")):
    axis_windows = [w[axis] for w in windows]
    size = img_size[axis]
    if _axis_fits(size, patch_size, axis_windows):
      continue
    step = patch_size
    candidates = [s for s in range(step, 4 * size + step, step)
                  if _axis_fits(s, patch_size, axis_windows)]
    nearest = sorted(candidates, key=lambda s: (abs(s - size), s))[:6]
    problems.append(
        f"image {name} {size} does not fit patch {patch_size}, 2x merges and windows "
        f"{axis_windows}; sizes that work near it: {sorted(nearest)}")
  if problems:
    raise ValueError("; ".join(problems))
