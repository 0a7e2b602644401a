"""The key layouts of PyTorch Swin V2 state dicts, and renaming between them.

- official (microsoft/Swin-Transformer `models/swin_transformer_v2.py`): `layers.{i}.blocks.{k}`,
  the PatchMerging of level i at the END of level i (`layers.{i}.downsample`), `head.weight`;
- timm (`timm.models.swin_transformer_v2`): the PatchMerging at the START of the next level
  (timm `layers.{i+1}.downsample` == official `layers.{i}.downsample`), `head.fc.weight`;
- simmim (official `models/simmim.py`): everything under `encoder.`, the legacy `rpe_mlp` name
  for `cpb_mlp`, `encoder.mask_token`, the decoder `decoder.0.{weight,bias}`.

The official names are the common currency: `to_official_layout` renames any layout to them,
and the `official_to_*` functions rename back. Buffers (`BUFFER_NAMES`) are recomputed by our
model, so they are dropped here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Non-persistent tensors of the PyTorch models: recomputed by our model, never loaded.
BUFFER_NAMES = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
HEAD_KEYS = ("head.weight", "head.bias")  # official names
LAYOUTS = ("official", "timm", "simmim")

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def is_buffer(name: str) -> bool:
  return name.rsplit(".", 1)[-1] in BUFFER_NAMES


def detect_layout(state: Mapping[str, Any]) -> str:
  """'simmim', 'timm' or 'official' for a flat state dict."""
  names = list(state)
  if any(n.startswith("encoder.") for n in names):
    return "simmim"
  downsample_levels = {int(m.group(1)) for n in names if (m := _DOWNSAMPLE.match(n))}
  if downsample_levels:
    # Official: merging ends levels 0..n-2; timm: it starts levels 1..n-1.
    return "official" if 0 in downsample_levels else "timm"
  if any(n.startswith("head.fc.") for n in names):
    return "timm"
  return "official"  # one level and no head: both layouts coincide


def _renumber_downsample(name: str, offset: int) -> str:
  return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + offset}.downsample.", name)


def timm_to_official_name(name: str) -> str:
  name = _renumber_downsample(name, -1)
  return "head." + name[len("head.fc."):] if name.startswith("head.fc.") else name


def official_to_timm_name(name: str) -> str:
  name = _renumber_downsample(name, +1)
  return "head.fc." + name[len("head."):] if name.startswith("head.") else name


def official_to_simmim_name(name: str) -> str:
  """Backbone and `mask_token` under `encoder.`; the decoder keeps its name."""
  return name if name.startswith("decoder.") else "encoder." + name


def to_official_layout(state: Mapping[str, np.ndarray]) -> tuple[dict, dict, str]:
  """Renames a state dict to the official classifier layout.

  Returns (backbone, extras, layout): `backbone` maps official names (no `encoder.` prefix,
  buffers removed) to arrays; `extras` holds SimMIM's `mask_token` and `decoder.0.*`.
  """
  layout = detect_layout(state)
  backbone, extras = {}, {}
  for name, value in state.items():
    if is_buffer(name):
      continue
    name = name.replace(".rpe_mlp.", ".cpb_mlp.")
    if layout == "simmim":
      if name.startswith("decoder."):
        extras[name] = value
        continue
      if name.startswith("encoder."):
        name = name[len("encoder."):]
        if name == "mask_token":
          extras[name] = value
          continue
      # anything else keeps its name and surfaces as unexpected
    elif layout == "timm":
      name = timm_to_official_name(name)
    if name in backbone:
      raise ValueError(f"checkpoint has two entries for {name!r} (mixed layouts?)")
    backbone[name] = value
  return backbone, extras, layout
