"""Our NNX parameter tree <-> PyTorch state dicts: `load_pytorch_weights`, `to_pytorch_state_dict`.

Every nnx.Param leaf of the model is an `_Entry`: the official-layout tensor names it is built
from (several for the blocks of a scanned group, stacked on a leading axis) and the array
transforms both ways. Loading renames the checkpoint to the official layout (`layouts`) and
requires a one-to-one match: missing or unexpected keys and wrong shapes raise one ValueError
that lists them all. The classifier head is the one deliberate exception, governed by
`drop_head` (`heads.check_head`).

The extra LayerNorm of H/G (paper section 3.6) has no counterpart in the official or timm
SwinV2; it is read/written as `layers.{i}.blocks.{k}.norm3.{weight,bias}` on the last block
`k` of each group of `extra_norm_period` blocks (the name timm's swinv2_cr uses for it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from swinv2_jax.weights import heads
from swinv2_jax.weights import layouts
from swinv2_jax.weights.readers import read_state_dict


class _Transform(NamedTuple):
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


# to_ours leaves arrays of an unexpected rank alone: the shape check then reports them.
_IDENTITY = _Transform(lambda a: a, lambda a: a)
# torch Linear (out, in) <-> ours (in, out)
_LINEAR = _Transform(lambda w: np.transpose(w) if w.ndim == 2 else w, np.transpose)
# torch Conv2d (out, in, kh, kw) <-> ours (kh, kw, in, out)
_CONV = _Transform(lambda w: np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w,
                   lambda w: np.transpose(w, (3, 2, 0, 1)))


def _mask_token_transform(shape: tuple[int, ...]) -> _Transform:
  # torch (1, 1, C) <-> ours (1, 1, 1, C)
  return _Transform(lambda a: a.reshape(shape) if a.size == np.prod(shape) else a,
                    lambda a: a.reshape(1, 1, -1))


def _leaf_to_torch(module_path: list[str], leaf: str, shape: tuple[int, ...]):
  """(torch name for the leaf, its _Transform)."""
  module_path = list(module_path)
  # The CPB meta MLP is an nn.Sequential in torch: Linear(0), ReLU(1), Linear(2).
  if len(module_path) >= 2 and module_path[-2] == "cpb_mlp":
    module_path[-1] = {"fc1": "0", "fc2": "2"}[module_path[-1]]
  prefix = ".".join(module_path)
  if leaf == "kernel":
    return f"{prefix}.weight", (_CONV if len(shape) == 4 else _LINEAR)
  if leaf == "scale":
    return f"{prefix}.weight", _IDENTITY
  return (f"{prefix}.{leaf}" if prefix else leaf), _IDENTITY


def _leaf_suffix(module_path: list[str], leaf: str, shape: tuple[int, ...]):
  """(`.inner.name` to append to a block's torch name, its _Transform)."""
  name, transform = _leaf_to_torch(["x"] + module_path, leaf, shape)
  return name[len("x"):], transform


class _Entry(NamedTuple):
  """One model Param leaf and the official-layout tensors it is built from."""
  path: tuple
  shape: tuple[int, ...]
  dtype: object
  torch_names: list[str]
  transform: _Transform
  stacked: bool  # one torch tensor per group, stacked on our leading axis

  @property
  def item_shape(self):
    return self.shape[1:] if self.stacked else self.shape


def _backbone_entries(backbone, flat_params, prefix: tuple = ()) -> list[_Entry]:
  """Entries for a SwinTransformerV2 whose params sit under `prefix` in `flat_params`."""
  entries = []
  for path, variable in flat_params:
    if tuple(path[:len(prefix)]) != prefix:
      continue
    rel = [str(p) for p in path[len(prefix):]]
    value = variable.get_value()
    shape, dtype = tuple(value.shape), value.dtype
    leaf = rel[-1]
    if rel[0] == "levels" and rel[2] in ("groups", "tail"):
      # levels.{i}.groups.{blocks.{j}|extra_norm}...: group g's block j is torch block
      # g * per_group + j; levels.{i}.tail.blocks.{j} follows the last group.
      level_idx = int(rel[1])
      level = backbone.levels[level_idx]
      per_group, num_groups = int(level.blocks_per_group), int(level.num_groups)
      if rel[2] == "groups" and rel[3] == "extra_norm":
        suffix, transform = _leaf_suffix([], leaf, shape[1:])
        names = [f"layers.{level_idx}.blocks.{g * per_group + per_group - 1}.norm3{suffix}"
                 for g in range(num_groups)]
        entries.append(_Entry(tuple(path), shape, dtype, names, transform, stacked=True))
        continue
      stacked = rel[2] == "groups"
      if stacked:
        block_ids = [g * per_group + int(rel[4]) for g in range(num_groups)]
      else:
        block_ids = [num_groups * per_group + int(rel[4])]
      suffix, transform = _leaf_suffix(rel[5:-1], leaf, shape[1:] if stacked else shape)
      names = [f"layers.{level_idx}.blocks.{k}{suffix}" for k in block_ids]
      entries.append(_Entry(tuple(path), shape, dtype, names, transform, stacked))
      continue
    modules = ["layers" if (i == 0 and p == "levels") else p for i, p in enumerate(rel[:-1])]
    name, transform = _leaf_to_torch(modules, leaf, shape)
    entries.append(_Entry(tuple(path), shape, dtype, [name], transform, stacked=False))
  return entries


def _is_simmim_module(model) -> bool:
  return all(hasattr(model, a) for a in ("encoder", "mask_token", "decoder"))


def _simmim_extra_entries(flat_params) -> list[_Entry]:
  entries = []
  for path, variable in flat_params:
    rel = [str(p) for p in path]
    if rel[0] == "encoder":
      continue
    value = variable.get_value()
    shape = tuple(value.shape)
    if rel == ["mask_token"]:
      entries.append(_Entry(tuple(path), shape, value.dtype, ["mask_token"],
                            _mask_token_transform(shape), stacked=False))
    elif rel[0] == "decoder":
      # nnx.Conv 1x1 <- torch nn.Sequential(Conv2d, PixelShuffle)[0]
      name, transform = _leaf_to_torch(["decoder", "0"], rel[-1], shape)
      entries.append(_Entry(tuple(path), shape, value.dtype, [name], transform, False))
    else:
      raise ValueError(f"don't know how to load SimMIM parameter {'.'.join(rel)}")
  return entries


def _model_entries(model, flat_params) -> list[_Entry]:
  if _is_simmim_module(model):
    return (_backbone_entries(model.encoder, flat_params, prefix=("encoder",))
            + _simmim_extra_entries(flat_params))
  return _backbone_entries(model, flat_params)


def load_pytorch_weights(model, source, *, drop_head: bool = False):
  """Loads PyTorch Swin V2 weights (official, timm or SimMIM layout) into `model` in place.

  Args:
    model: a `SwinTransformerV2`, or a SimMIM pretraining module with attributes `encoder`
      (a SwinTransformerV2 with num_classes=0), `mask_token` (Param (1, 1, 1, C)) and
      `decoder` (a 1x1 nnx.Conv).
    source: path to `.safetensors` or `.pth`/`.pt`/`.bin` (neither needs torch), an
      `hf-hub:<owner>/<name>` id (`hub`), or a mapping name -> array (numpy or torch).
    drop_head: keep the model's own (freshly initialised) classifier head and ignore any head
      in the checkpoint; needed to fine-tune on another number of classes, or to build a
      classifier from a headless (SimMIM, num_classes=0) checkpoint.

  Returns:
    `model`, updated.
  """
  state = read_state_dict(source)
  backbone_state, extras, layout = layouts.to_official_layout(state)
  logging.info("Checkpoint layout: %s (%d tensors)", layout, len(state))

  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  entries = _model_entries(model, flat)
  available = dict(backbone_state)
  if _is_simmim_module(model):
    backbone = model.encoder
    available.update(extras)  # mask_token / decoder.0.* are expected here
  else:
    backbone = model
    if extras:
      logging.info("Dropping the SimMIM pretraining parameters %s: a classifier has no use "
                   "for them.", sorted(extras))

  problems: list[str] = []
  # --- the classifier head, the one place where a mismatch may be deliberate ---
  model_classes = backbone.num_classes if getattr(backbone, "head", None) is not None else 0
  ckpt_head = {k: available.pop(k) for k in layouts.HEAD_KEYS if k in available}
  # A head of bias alone (never written) counts as one; its shape is then checked below.
  ckpt_classes = len(ckpt_head.get("head.weight", ckpt_head.get("head.bias", ())))
  if heads.check_head(ckpt_classes, model_classes, drop_head):
    available.update(ckpt_head)
  elif model_classes:
    entries = [e for e in entries if e.torch_names[0] not in layouts.HEAD_KEYS]

  # --- everything else must match one to one ---
  expected = [n for e in entries for n in e.torch_names]
  missing = [n for n in expected if n not in available]
  unexpected = sorted(set(available) - set(expected))
  if missing:
    problems.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected in the checkpoint ({len(unexpected)}): "
                    + ", ".join(unexpected))

  new_values = {}
  if not missing:
    for e in entries:
      arrays = []
      for name in e.torch_names:
        array = e.transform.to_ours(available[name])
        if tuple(array.shape) != tuple(e.item_shape):
          problems.append(
              f"shape mismatch for {name}: checkpoint {tuple(available[name].shape)} "
              f"(as ours {tuple(array.shape)}) vs model {'.'.join(map(str, e.path))} "
              f"{tuple(e.item_shape)}")
          break
        arrays.append(np.asarray(array, dtype=np.float32))
      else:
        value = np.stack(arrays) if e.stacked else arrays[0]
        new_values[e.path] = value.astype(e.dtype)

  if not problems:
    abstract = [".".join(map(str, path)) for path, variable in flat
                if tuple(path) not in new_values
                and isinstance(variable.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
      problems.append(
          "the model is abstract (nnx.eval_shape) and these parameters would stay "
          "uninitialised (drop_head needs a concrete model): " + ", ".join(abstract))
  if problems:
    raise ValueError(
        f"cannot load the checkpoint ({layout} layout) into "
        f"{type(model).__name__}:\n  " + "\n  ".join(problems))

  for path, variable in flat:
    if tuple(path) in new_values:
      variable.set_value(jnp.asarray(new_values[tuple(path)]))
  nnx.update(model, nnx.from_flat_state(flat))
  logging.info("Loaded %d tensors (%s layout) into %s.", sum(len(e.torch_names) for e in entries),
               layout, type(model).__name__)
  return model


def to_pytorch_state_dict(model, layout: str = "official") -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch-style state dict (numpy arrays; no buffers).

  `layout` is 'official' or 'timm' for a SwinTransformerV2; a SimMIM module always gives the
  official SimMIM names (`encoder.*`, `encoder.mask_token`, `decoder.0.*`).
  `load_pytorch_weights` reads the result back unchanged.
  """
  if layout not in ("official", "timm"):
    raise ValueError(f"layout must be 'official' or 'timm', got {layout!r}")
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  if _is_simmim_module(model):
    rename = layouts.official_to_simmim_name
  elif layout == "timm":
    rename = layouts.official_to_timm_name
  else:
    rename = lambda name: name
  values = {tuple(path): np.asarray(v.get_value()) for path, v in flat}
  out = {}
  for e in _model_entries(model, flat):
    value = values[e.path]
    for name, item in zip(e.torch_names, list(value) if e.stacked else [value]):
      # C order: safetensors writes raw memory.
      out[rename(name)] = np.ascontiguousarray(e.transform.to_torch(item))
  return out
