"""Reading a checkpoint file into a flat state dict {name: np.ndarray}; nothing Swin-specific.

Neither format needs torch: `.safetensors` (bfloat16 included), and `.pth`/`.pt`/`.bin`/`.ckpt`
(torch.save zips) through the restricted unpickler of `pth`, whether or not torch is
installed. An `hf-hub:` id (`hub`) is fetched first and read as the file it names.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from swinv2_jax import errors
from swinv2_jax.weights import hub
from swinv2_jax.weights import pth

# Containers that training checkpoints put the state dict in, next to `optimizer` etc.
_WRAPPER_KEYS = ("model", "state_dict", "module")
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CorruptCheckpointError(errors.UserError, ValueError):
  """A checkpoint file that is cut short or not what its suffix says."""


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
      f"checkpoint {path} is truncated or corrupt ({problem}); download it again")


def check_checkpoint_file(path: str) -> None:
  """Cheap checks of a checkpoint file, before anything loads it: it exists, has a known
  suffix, and is whole. A .safetensors file's header is read and its tensors must end within
  the file; a .pth (zip, torch >= 1.6) must have the zip directory at its end. Only the header
  and the zip directory are read. Raises FileNotFoundError or CorruptCheckpointError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(SAFETENSORS_SUFFIXES):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise _corrupt(path, f"{size} bytes, less than a safetensors header")
      (header_len,) = struct.unpack("<Q", head)
      if 8 + header_len > size:
        raise _corrupt(path, f"its header claims {header_len} bytes but the file has {size}")
      try:
        header = json.loads(f.read(header_len))
        end = max((int(info["data_offsets"][1]) for name, info in header.items()
                   if name != "__metadata__"), default=0)
      except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise _corrupt(path, f"unreadable safetensors header: {e}") from None
    if 8 + header_len + end > size:
      raise _corrupt(path, f"{size} bytes where its header needs {8 + header_len + end}")
  elif path.endswith(TORCH_SUFFIXES):
    with open(path, "rb") as f:
      magic = f.read(4)
    if not magic:
      raise _corrupt(path, "an empty file")
    # torch.save writes a zip since torch 1.6; older files are a bare pickle (not checked).
    if magic == b"PK\x03\x04":
      try:
        with zipfile.ZipFile(path):
          pass
      except zipfile.BadZipFile as e:
        raise _corrupt(path, f"broken zip archive: {e}") from None
  else:
    raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors, .pth or .pt")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except KeyError:
    # safetensors.numpy knows no bfloat16 (numpy has none): parse the file ourselves.
    return _read_safetensors_raw(path)
  except SafetensorError as e:
    raise _corrupt(path, str(e)) from e


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


def _read_pth(path: str) -> Mapping[str, Any]:
  try:
    raw = pth.read_pth(path)
  except zipfile.BadZipFile as e:  # e.g. a storage entry cut short
    raise _corrupt(path, str(e)) from e
  if not isinstance(raw, Mapping):
    raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict")
  return raw


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (in a mapping): float() also handles bfloat16
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(source) -> dict[str, np.ndarray]:
  """A flat {name: np.ndarray} from a .pth/.pt/.safetensors path, an `hf-hub:` id or a mapping.

  A top-level `model` / `state_dict` / `module` wrapper (as in official training checkpoints,
  next to `optimizer` etc.) is unwrapped; a DDP `module.` prefix on every key is stripped.
  """
  if isinstance(source, (str, os.PathLike)):
    path = hub.fetch(source) if hub.is_hub_id(source) else os.fspath(source)
    check_checkpoint_file(path)  # missing, unknown format, truncated: before reading it all
    if path.endswith(SAFETENSORS_SUFFIXES):
      raw: Mapping[str, Any] = _read_safetensors(path)
    else:
      raw = _read_pth(path)
  elif isinstance(source, Mapping):
    raw = source
  else:
    raise TypeError(f"source must be a path or a mapping name -> array, got {type(source)}")
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
