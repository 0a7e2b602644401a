"""Swin Transformer V2 models: `create(name, **overrides)` and `list_models()`."""

from __future__ import annotations

from swinv2_jax.models.presets import PRESETS
from swinv2_jax.models.swinv2 import REMAT_POLICIES, SwinTransformerV2

__all__ = ["PRESETS", "REMAT_POLICIES", "SwinTransformerV2", "create", "list_models",
           "preset_config"]


def list_models() -> list[str]:
  return sorted(PRESETS)


def preset_config(name: str, **overrides) -> dict:
  """The constructor arguments of preset `name` with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
  return {**PRESETS[name], **overrides}


def create(name: str, **overrides) -> SwinTransformerV2:
  """Builds preset `name`; overrides are SwinTransformerV2 arguments (num_classes, img_size,
  window_size, pretrained_window_sizes, embed_dim, depths, num_heads, drop_path_rate, dtype,
  remat, attention_chunks, rngs, ...)."""
  return SwinTransformerV2(**preset_config(name, **overrides))
