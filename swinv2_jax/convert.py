"""PyTorch Swin V2 weights -> this project's Flax NNX models, and orbax save/restore.

`load_pytorch_weights(model, source)` reads a state dict (a `.pth`/`.pt` file, which needs
torch; a `.safetensors` file, which does not; or a mapping name -> array) in any of the
layouts the released weights come in, and writes it into `model` in place:

- official (microsoft/Swin-Transformer `models/swin_transformer_v2.py`): `layers.{i}.blocks.{k}`,
  the PatchMerging of stage i at the END of stage i (`layers.{i}.downsample`), `head.weight`;
- timm (`timm.models.swin_transformer_v2`): the PatchMerging at the START of the next stage
  (timm `layers.{i+1}.downsample` == official `layers.{i}.downsample`), `head.fc.weight`;
- SimMIM pretraining (official `models/simmim.py`): everything under `encoder.`, the legacy
  `rpe_mlp` name for `cpb_mlp`, `encoder.mask_token`, the decoder `decoder.0.{weight,bias}`,
  optionally wrapped in a top-level `model` (or `state_dict`) key.

The layout is detected from the keys. Buffers (`relative_position_index`,
`relative_coords_table`, `attn_mask`, `k_bias`) are recomputed by the model and ignored here.
Everything else must match one to one: missing or unexpected keys and wrong shapes raise one
ValueError that lists them all. The classifier head is the one deliberate exception, governed
by `drop_head`.

The extra LayerNorm of H/G (paper section 3.6) has no counterpart in the official or timm
SwinV2; it is read/written as `layers.{i}.blocks.{k}.norm3.{weight,bias}` on the last block
`k` of each group of `extra_norm_period` blocks (the name timm's swinv2_cr uses for it).

CLI: `python -m swinv2_jax.convert --checkpoint=IN --model=NAME --output=DIR` writes an orbax
checkpoint of the parameters (see `save_params`), with `model.json` recording the model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

# Non-persistent tensors of the PyTorch models: recomputed by our model, never loaded.
BUFFER_NAMES = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
# Top-level SimMIM pretraining parameters (after the `encoder.` prefix is resolved).
SIMMIM_EXTRA_KEYS = ("mask_token", "decoder.0.weight", "decoder.0.bias")
HEAD_KEYS = ("head.weight", "head.bias")
LAYOUTS = ("official", "timm", "simmim")
MODEL_JSON = "model.json"
PARAMS_SUBDIR = "params"

_WRAPPER_KEYS = ("model", "state_dict", "module")


# ---------------------------------------------------------------------------------------------
# Reading a source into {name: np.ndarray}
# ---------------------------------------------------------------------------------------------

def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except KeyError:
    # safetensors.numpy knows no bfloat16 (numpy has none): parse the file ourselves.
    return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
    out[name] = array.reshape(info["shape"])
  return out


def _read_torch(path: str, trust_pickle: bool) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch (`pip install torch`), which this project does not "
        "require. Convert it to .safetensors once (needs no torch to load), or pass a dict "
        "of numpy arrays.") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError and friends: non-tensor objects inside
    if not trust_pickle:
      raise ValueError(
          f"{path} holds more than tensors (e.g. a training config object), which "
          "torch.load(weights_only=True) refuses. If you trust the file, pass "
          f"trust_pickle=True (CLI: --trust_pickle). Underlying error: {e}") from e
    logging.warning("Loading %s with weights_only=False (trusted pickle).", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor: float() also handles bfloat16
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(source, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """A flat {name: np.ndarray} from a .pth/.pt/.safetensors path or a mapping.

  A top-level `model` / `state_dict` / `module` wrapper (as in official training checkpoints,
  next to `optimizer` etc.) is unwrapped; a DDP `module.` prefix on every key is stripped.
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
      raw: Mapping[str, Any] = _read_safetensors(path)
    elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
      raw = _read_torch(path, trust_pickle)
    else:
      raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors, .pth or .pt")
  elif isinstance(source, Mapping):
    raw = source
  else:
    raise TypeError(f"source must be a path or a mapping name -> array, got {type(source)}")
  # Unwrap {'model': {...}, 'optimizer': ...} style containers.
  while True:
    wrapper = next((k for k in _WRAPPER_KEYS
                    if k in raw and isinstance(raw[k], Mapping)), None)
    if wrapper is None:
      break
    raw = raw[wrapper]
  state = {}
  for name, value in raw.items():
    if isinstance(value, Mapping):
      raise ValueError(f"checkpoint entry {name!r} is a nested mapping, not a tensor; "
                       "expected a flat state dict")
    state[str(name)] = _to_numpy(value)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


# ---------------------------------------------------------------------------------------------
# Layout normalisation: anything -> official key names
# ---------------------------------------------------------------------------------------------

def _is_buffer(name: str) -> bool:
  return name.rsplit(".", 1)[-1] in BUFFER_NAMES


def detect_layout(state: Mapping[str, Any]) -> str:
  """'simmim', 'timm' or 'official' for a flat state dict."""
  names = list(state)
  if any(n.startswith("encoder.") for n in names):
    return "simmim"
  downsample_stages = {int(m.group(1)) for n in names
                       if (m := re.match(r"layers\.(\d+)\.downsample\.", n))}
  if downsample_stages:
    # Official: merging ends stages 0..n-2; timm: it starts stages 1..n-1.
    return "official" if 0 in downsample_stages else "timm"
  if any(n.startswith("head.fc.") for n in names):
    return "timm"
  return "official"  # one stage and no head: both layouts coincide


def to_official_layout(state: Mapping[str, np.ndarray]) -> tuple[dict, dict, str]:
  """Renames a state dict to the official classifier layout.

  Returns (backbone, extras, layout): `backbone` maps official names (no `encoder.` prefix,
  buffers removed) to arrays; `extras` holds SimMIM's `mask_token` and `decoder.0.*`.
  """
  layout = detect_layout(state)
  backbone, extras = {}, {}
  for name, value in state.items():
    if _is_buffer(name):
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
      name = re.sub(r"^layers\.(\d+)\.downsample\.",
                    lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
      if name.startswith("head.fc."):
        name = "head." + name[len("head.fc."):]
    if name in backbone:
      raise ValueError(f"checkpoint has two entries for {name!r} (mixed layouts?)")
    backbone[name] = value
  return backbone, extras, layout


# ---------------------------------------------------------------------------------------------
# Model parameter paths <-> official names
# ---------------------------------------------------------------------------------------------

# Transforms leave arrays of an unexpected rank alone: the shape check then reports them.
def _transpose_linear(w):  # torch (out, in) -> (in, out)
  return np.transpose(w) if w.ndim == 2 else w


def _conv_to_flax(w):  # torch (out, in, kh, kw) -> (kh, kw, in, out)
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _leaf_to_torch(module_path: list[str], leaf: str, shape: tuple[int, ...]):
  """(torch name suffix for the leaf, transform torch array -> our array)."""
  module_path = list(module_path)
  # The CPB meta MLP is an nn.Sequential in torch: Linear(0), ReLU(1), Linear(2).
  if len(module_path) >= 2 and module_path[-2] == "cpb_mlp":
    module_path[-1] = {"fc1": "0", "fc2": "2"}[module_path[-1]]
  prefix = ".".join(module_path)
  if leaf == "kernel":
    if len(shape) == 4:
      return f"{prefix}.weight", _conv_to_flax
    return f"{prefix}.weight", _transpose_linear
  if leaf == "scale":
    return f"{prefix}.weight", None
  return (f"{prefix}.{leaf}" if prefix else leaf), None


class _Entry:
  """One model Param leaf and the torch tensors it is built from."""

  def __init__(self, path: tuple, shape: tuple[int, ...], dtype, torch_names: list[str],
               transform: Callable | None, stacked: bool):
    self.path = path
    self.shape = shape
    self.dtype = dtype
    self.torch_names = torch_names
    self.transform = transform
    self.stacked = stacked

  @property
  def item_shape(self):
    return self.shape[1:] if self.stacked else self.shape


def _num_groups(stage) -> int:
  leaf = jax.tree.leaves(nnx.state(stage.groups, nnx.Param))[0]
  return int(leaf.shape[0])


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
    if rel[0] == "stages" and rel[2] in ("groups", "tail"):
      stage_idx = int(rel[1])
      stage = backbone.stages[stage_idx]
      per_group = int(stage.blocks_per_group)
      # Stacked leaves carry the group count as their leading axis.
      num_groups = 0 if stage.groups is None else int(getattr(stage, "num_groups", 0)) or (
          shape[0] if rel[2] == "groups" else _num_groups(stage))
      if rel[2] == "groups":
        if rel[3] == "extra_norm":
          # After the last block of each group: timm swinv2_cr's `norm3` of that block.
          names = [f"layers.{stage_idx}.blocks.{g * per_group + per_group - 1}.norm3"
                   for g in range(num_groups)]
          suffix, transform = _leaf_to_torch(["x"], leaf, shape[1:])
          suffix = suffix[len("x"):]
          entries.append(_Entry(path, shape, dtype, [n + suffix for n in names], transform,
                                stacked=True))
          continue
        j = int(rel[4])
        block_ids = [g * per_group + j for g in range(num_groups)]
        stacked = True
      else:
        block_ids = [num_groups * per_group + int(rel[4])]
        stacked = False
      inner = rel[5:-1]
      item_shape = shape[1:] if stacked else shape
      suffix, transform = _leaf_to_torch(["x"] + inner, leaf, item_shape)
      suffix = suffix[len("x"):]
      names = [f"layers.{stage_idx}.blocks.{k}{suffix}" for k in block_ids]
      entries.append(_Entry(path, shape, dtype, names, transform, stacked))
      continue
    modules = ["layers" if (i == 0 and p == "stages") else p for i, p in enumerate(rel[:-1])]
    name, transform = _leaf_to_torch(modules, leaf, shape)
    entries.append(_Entry(path, shape, dtype, [name], transform, stacked=False))
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
      # torch (1, 1, C) -> ours (1, 1, 1, C)
      entries.append(_Entry(tuple(path), shape, value.dtype, ["mask_token"],
                            lambda a, s=shape: a.reshape(s) if a.size == np.prod(s) else a,
                            stacked=False))
    elif rel[0] == "decoder":
      # nnx.Conv 1x1 <- torch nn.Sequential(Conv2d, PixelShuffle)[0]
      name, transform = _leaf_to_torch(["decoder", "0"], rel[-1], shape)
      entries.append(_Entry(tuple(path), shape, value.dtype, [name], transform, False))
    else:
      raise ValueError(f"don't know how to load SimMIM parameter {'.'.join(rel)}")
  return entries


def _num_params(flat_params) -> int:
  return sum(int(np.prod(v.get_value().shape)) for _, v in flat_params)


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def load_pytorch_weights(model, source, *, drop_head: bool = False,
                         trust_pickle: bool = False):
  """Loads PyTorch Swin V2 weights (official, timm or SimMIM layout) into `model` in place.

  Args:
    model: a `SwinTransformerV2`, or a SimMIM pretraining module with attributes `encoder`
      (a SwinTransformerV2 with num_classes=0), `mask_token` (Param (1, 1, 1, C)) and
      `decoder` (a 1x1 nnx.Conv).
    source: path to `.safetensors` (no torch needed) or `.pth`/`.pt` (needs torch), or a
      mapping name -> array (numpy or torch).
    drop_head: keep the model's own (freshly initialised) classifier head and ignore any head
      in the checkpoint; needed to fine-tune on another number of classes, or to build a
      classifier from a headless (SimMIM, num_classes=0) checkpoint.
    trust_pickle: allow `torch.load(weights_only=False)` for .pth files that hold non-tensor
      objects; only for files you trust.

  Returns:
    `model`, updated.
  """
  state = read_state_dict(source, trust_pickle=trust_pickle)
  backbone_state, extras, layout = to_official_layout(state)
  logging.info("Checkpoint layout: %s (%d tensors)", layout, len(state))

  params = nnx.state(model, nnx.Param)
  flat = list(nnx.to_flat_state(params))
  simmim_target = _is_simmim_module(model)
  if simmim_target:
    backbone = model.encoder
    entries = _backbone_entries(backbone, flat, prefix=("encoder",))
    entries += _simmim_extra_entries(flat)
    available = dict(backbone_state)
    available.update(extras)  # mask_token / decoder.0.* are expected here
  else:
    backbone = model
    entries = _backbone_entries(backbone, flat)
    available = dict(backbone_state)
    if extras:
      logging.info("Dropping the SimMIM pretraining parameters %s: a classifier has no use "
                   "for them.", sorted(extras))

  problems: list[str] = []
  # --- the classifier head, the one place where a mismatch may be deliberate ---
  model_has_head = getattr(backbone, "head", None) is not None
  ckpt_head = {k: available.pop(k) for k in HEAD_KEYS if k in available}
  head_entries = [e for e in entries if e.torch_names[0] in HEAD_KEYS] if model_has_head else []
  if drop_head:
    entries = [e for e in entries if e not in head_entries]
    if ckpt_head:
      logging.info("drop_head: ignoring the checkpoint's head %s; the model keeps its own "
                   "initialisation.", {k: v.shape for k, v in ckpt_head.items()})
  elif model_has_head and not ckpt_head:
    raise ValueError(
        f"the checkpoint ({layout} layout) has no classifier head (e.g. a SimMIM or "
        f"num_classes=0 checkpoint) but the model has one with {backbone.num_classes} classes: "
        "pass drop_head=True to keep the model's freshly initialised head (CLI: --drop_head), "
        "or build the model with num_classes=0")
  elif not model_has_head and ckpt_head:
    n = ckpt_head["head.weight"].shape[0] if "head.weight" in ckpt_head else "?"
    raise ValueError(
        f"the checkpoint has a classifier head ({n} classes) but the model has none "
        "(num_classes=0): pass drop_head=True to discard it, or build the model with "
        f"num_classes={n}")
  elif model_has_head:
    w = ckpt_head.get("head.weight")
    if w is not None and w.shape[0] != backbone.num_classes:
      raise ValueError(
          f"the checkpoint's head has {w.shape[0]} classes (head.weight {tuple(w.shape)}) but "
          f"the model has num_classes={backbone.num_classes}: pass drop_head=True to keep the "
          "model's freshly initialised head (CLI: --drop_head), or build the model with "
          f"num_classes={w.shape[0]}")
    available.update(ckpt_head)

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
        array = available[name]
        if e.transform is not None:
          array = e.transform(array)
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
  simmim = _is_simmim_module(model)
  if simmim:
    entries = _backbone_entries(model.encoder, flat, prefix=("encoder",))
    entries += _simmim_extra_entries(flat)
  else:
    entries = _backbone_entries(model, flat)
  inverse = {_transpose_linear: _transpose_linear,
             _conv_to_flax: lambda w: np.transpose(w, (3, 2, 0, 1))}
  values = {tuple(path): np.asarray(v.get_value()) for path, v in flat}
  out = {}
  for e in entries:
    value = values[e.path]
    for name, item in zip(e.torch_names, list(value) if e.stacked else [value]):
      if name == "mask_token":
        out["encoder.mask_token"] = item.reshape(1, 1, -1)
        continue
      if e.transform in inverse:
        item = inverse[e.transform](item)
      if simmim and not name.startswith("decoder."):
        name = "encoder." + name
      elif layout == "timm":
        name = re.sub(r"^layers\.(\d+)\.downsample\.",
                      lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", name)
        if name.startswith("head."):
          name = "head.fc." + name[len("head."):]
      out[name] = np.ascontiguousarray(item)  # C order: safetensors writes raw memory
  return out


# ---------------------------------------------------------------------------------------------
# Orbax save / restore
# ---------------------------------------------------------------------------------------------

def _pure_params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flatten_dict(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten_dict(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def save_params(directory: str, model, model_config: Mapping[str, Any] | None = None) -> str:
  """Writes the model's nnx.Param state (a pure dict) with orbax to `directory/params`, and
  `directory/model.json` with `model_config` (the constructor arguments; see `restore_model`).

  Returns the params path.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, PARAMS_SUBDIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, _pure_params(model), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump(dict(model_config or {}), f, indent=2, sort_keys=True)
  return path


def load_model_config(directory: str) -> dict:
  with open(os.path.join(os.path.abspath(directory), MODEL_JSON)) as f:
    return json.load(f)


def load_params(directory: str, model):
  """Restores `save_params` output onto `model` (in place; returns it).

  The saved tree must have exactly the model's parameter names and shapes; otherwise a
  ValueError names every mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(directory), PARAMS_SUBDIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no orbax parameter checkpoint at {path}")
  target = _pure_params(model)
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
    saved_tree = getattr(metadata, "item_metadata", metadata)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    saved = {k: tuple(v.shape) for k, v in _flatten_dict(dict(saved_tree)).items()}
    wanted = {k: tuple(v.shape) for k, v in _flatten_dict(target).items()}
    problems = []
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing:
      problems.append("not in the checkpoint: " + ", ".join(".".join(k) for k in missing))
    if extra:
      problems.append("not in the model: " + ", ".join(".".join(k) for k in extra))
    for k in sorted(set(saved) & set(wanted)):
      if saved[k] != wanted[k]:
        problems.append(f"shape mismatch for {'.'.join(k)}: checkpoint {saved[k]} vs model "
                        f"{wanted[k]}")
    if problems:
      raise ValueError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    restored = checkpointer.restore(path, abstract)
  finally:
    checkpointer.close()
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model


def restore_model(directory: str, **overrides):
  """Builds the model recorded in `directory/model.json` and restores its parameters.

  The model is built abstractly (nnx.eval_shape: no random init, no second copy in memory)
  and every parameter then comes from the checkpoint.
  """
  from swinv2_jax import models  # pylint: disable=g-import-not-at-top
  config = load_model_config(directory)
  kwargs = {**config.get("overrides", {}), **overrides}
  model = nnx.eval_shape(lambda: models.create(config["model"], **kwargs))
  return load_params(directory, model)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parse_ints(text: str | None):
  """'16' -> 16; '64,128' -> [64, 128]; None/'' -> None."""
  if text is None or text == "":
    return None
  values = [int(v) for v in re.split(r"[,x ]+", text.strip()) if v]
  return values[0] if len(values) == 1 else values


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint: .safetensors, .pth or .pt.")
  flags.DEFINE_string("model", None, "Model preset name (swinv2_jax.models.list_models()).")
  flags.DEFINE_string("output", None, "Output directory for the orbax checkpoint.")
  flags.DEFINE_integer("num_classes", None, "Classes of the head (0: no head). Preset default "
                       "if unset.")
  flags.DEFINE_string("img_size", None, "Input size: '256' or 'H,W'.")
  flags.DEFINE_string("window_size", None, "Window: '16', 'h,w', or one per stage "
                      "'32,32,32,48'.")
  flags.DEFINE_string("pretrained_window_sizes", None, "Per-stage pretraining windows, e.g. "
                      "'12,12,12,6'.")
  flags.DEFINE_string("overrides", None, "Further constructor arguments as a JSON object, e.g. "
                      "'{\"embed_dim\": 32}'.")
  flags.DEFINE_bool("drop_head", False, "Keep a freshly initialised head instead of the "
                    "checkpoint's.")
  flags.DEFINE_bool("trust_pickle", False, "Allow torch.load(weights_only=False).")
  flags.mark_flags_as_required(["checkpoint", "model", "output"])
  return flags.FLAGS


def cli_model_config(flag_values) -> dict:
  overrides: dict[str, Any] = {}
  if flag_values.overrides:
    overrides.update(json.loads(flag_values.overrides))
  if flag_values.num_classes is not None:
    overrides["num_classes"] = flag_values.num_classes
  for name in ("img_size", "window_size", "pretrained_window_sizes"):
    value = _parse_ints(getattr(flag_values, name))
    if value is not None:
      overrides[name] = value
  return {"model": flag_values.model, "overrides": overrides}


def _main(argv):
  del argv
  from swinv2_jax import models  # pylint: disable=g-import-not-at-top
  flag_values = FLAGS
  config = cli_model_config(flag_values)
  build = lambda: models.create(config["model"], **config["overrides"])
  # Every parameter comes from the checkpoint unless the head is dropped: skip the random init.
  model = build() if flag_values.drop_head else nnx.eval_shape(build)
  load_pytorch_weights(model, flag_values.checkpoint, drop_head=flag_values.drop_head,
                       trust_pickle=flag_values.trust_pickle)
  path = save_params(flag_values.output, model, config)
  count = _num_params(list(nnx.to_flat_state(nnx.state(model, nnx.Param))))
  print(f"parameters: {count:,}")
  print(f"converted {flag_values.checkpoint} -> {path} ({config['model']}, "
        f"overrides {json.dumps(config['overrides'], sort_keys=True)}, {count / 1e6:.2f}M params, "
        f"img_size {model.img_size}, windows {list(model.stage_windows)}, "
        f"num_classes {model.num_classes}{', head dropped' if flag_values.drop_head else ''})")


FLAGS = None

if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(_main)
