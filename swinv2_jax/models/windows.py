"""Static window geometry of Swin V2: window clamping, position tables and shift masks.

Everything here is plain numpy computed at trace time from Python ints, so none of it lives
in the model state (the official checkpoints' buffers are recomputed, never loaded).
"""

from __future__ import annotations

import functools
from typing import Sequence

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


@functools.lru_cache(maxsize=None)
def relative_position_index(window: Pair) -> np.ndarray:
  """Swin V1 index into the flattened (2Wh-1)*(2Ww-1) table for every token pair: (N, N)."""
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  rel[0] += wh - 1
  rel[1] += ww - 1
  return (rel[0] * (2 * ww - 1) + rel[1]).astype(np.int32)


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
def shift_attention_mask(feat_size: Pair, window: Pair, shift: Pair) -> np.ndarray | None:
  """Additive mask (nW, N, N) for shifted windows: -100 between tokens of different regions.

  After the cyclic shift each axis has up to three regions, [0, r-w), [r-w, r-s), [r-s, r)
  (the official slices (0,-w), (-w,-s), (-s,None)); tokens attend only within their region.
  """
  if not any(shift):
    return None
  region_ids = []
  for r, w, s in zip(feat_size, window, shift):
    ids = np.zeros(r, np.int32)
    if s > 0:
      ids[r - w:r - s] = 1
      ids[r - s:] = 2
    region_ids.append(ids)
  regions = region_ids[0][:, None] * 3 + region_ids[1][None, :]
  regions = partition_windows(regions[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
  different = regions[:, None, :] != regions[:, :, None]
  return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def stage_feature_sizes(img_size: Pair, patch_size: int, num_stages: int) -> list[Pair]:
  h, w = img_size[0] // patch_size, img_size[1] // patch_size
  return [(h // 2**i, w // 2**i) for i in range(num_stages)]


def _axis_fits(size: int, patch_size: int, windows: Sequence[int]) -> bool:
  """Whether one image side gives whole patches, even merges and whole windows in every stage."""
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
