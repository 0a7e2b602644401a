"""PyTorch `.pth` files without torch: the zip format of `torch.save` (torch >= 1.6), read by a
restricted unpickler that runs no code from the file.

A `torch.save` zip holds `<archive>/data.pkl`, the pickled object, and one entry
`<archive>/data/<key>` per storage (raw bytes, in the order `<archive>/byteorder` names). In the
pickle, a tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and a storage is a
persistent id `('storage', torch.<Type>Storage, key, location, numel)` (torch/serialization.py,
`_save` and `_load`).

A plain `pickle.load` calls whatever global the file names, so a `.pth` can run any code
(`os.system`, `builtins.eval`, a `__reduce__` gadget). This unpickler resolves only the globals
in `_ALLOWED` (tensor and parameter rebuilding, the storage types, OrderedDict) to functions of
its own; every other global is refused by name before anything is called. Pickle's own opcodes
build the rest: numbers, strings, None, dicts, lists, tuples. Tensors come back as numpy arrays,
bfloat16 as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import collections
import math
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np

from swinv2_jax import errors

# torch.<name>Storage -> element dtype (torch/storage.py, the legacy typed storages that
# `torch.save` names in its persistent ids).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(errors.UserError, ValueError):
  """A `.pth` this reader cannot read: not a torch.save zip, or a damaged one."""


class UnsafePickleError(PthError):
  """A `.pth` that names a global outside the allowed ones (code, or a non-tensor object)."""


class _StorageType:
  """What `torch.<Type>Storage` resolves to: only its element dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 as a numpy array: the storage itself when the tensor is
  all of it in C order (a state dict's tensors are), else a copy of the strided view."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}, not a storage")
  size, stride = tuple(size), tuple(stride)
  if (not all(isinstance(v, int) for v in (storage_offset, *size, *stride))
      or len(size) != len(stride) or storage_offset < 0 or min((*size, *stride), default=0) < 0):
    raise pickle.UnpicklingError(f"bad tensor geometry: offset {storage_offset!r}, size "
                                 f"{size!r}, stride {stride!r}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  # The last element must lie inside the storage: as_strided itself reads any address.
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride} at offset "
                                 f"{storage_offset} reaches past its storage of {storage.size}")
  contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
  if storage_offset == 0 and math.prod(size) == storage.size and all(
      s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
    return storage.reshape(size)  # the whole storage in C order, as a state dict stores it
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)  # owns its memory, C order


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """torch._utils._rebuild_parameter (an nn.Parameter, e.g. `state_dict(keep_vars=True)`)."""
  del requires_grad, backward_hooks
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals from `_ALLOWED` only; storages from the zip."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    # Every GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcode comes here: the one gate to code.
    allowed = _ALLOWED.get((module, name))
    if allowed is None:
      raise UnsafePickleError(f"{module}.{name}")
    return allowed

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not (
        isinstance(numel, int) and numel >= 0):
      raise pickle.UnpicklingError(f"bad storage id {pid!r:.80}")
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        size = self._archive.getinfo(name).file_size
      except KeyError:
        raise pickle.UnpicklingError(f"no storage entry {name}") from None
      storage = np.empty(numel, storage_type.dtype)
      if size != storage.nbytes:
        raise pickle.UnpicklingError(f"storage {name} has {size} bytes, not {numel} x "
                                     f"{storage.itemsize}")
      with self._archive.open(name) as f:  # straight into the array: one copy of the data
        if f.readinto(storage.view(np.uint8)) != size:
          raise pickle.UnpicklingError(f"storage {name} ends early")
      self._storages[key] = storage if self._byteorder == sys.byteorder else storage.byteswap()
    storage = self._storages[key]
    if storage.dtype != storage_type.dtype:  # one storage seen as two types
      raise pickle.UnpicklingError(f"storage {key} read as {storage.dtype} and "
                                   f"{storage_type.dtype}")
    return storage


def _pickle_entry(archive: zipfile.ZipFile, path: str) -> str:
  names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(names) != 1:
    raise PthError(f"{path} is a zip but not one torch.save wrote (expected one "
                     f"<archive>/data.pkl, found {len(names)})")
  return names[0]


def read_pth(path: str):
  """The object a `torch.save` zip holds, tensors as numpy arrays (e.g. {'model': {name:
  array}}).

  Raises UnsafePickleError (one line, naming the global) for anything but tensors, numbers,
  strings and plain containers; a legacy (torch < 1.6) or damaged file is a PthError.
  """
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":
    raise PthError(
        f"{path} is not a torch.save zip (a legacy torch < 1.6 file, or not a checkpoint): "
        "re-save it with a current torch (torch.save(torch.load(f), f)) or convert it to "
        ".safetensors")
  with zipfile.ZipFile(path) as archive:
    entry = _pickle_entry(archive, path)
    prefix = entry[:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    with archive.open(entry) as f:
      unpickler = _RestrictedUnpickler(f, archive, prefix, byteorder)
      try:
        return unpickler.load()
      except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused to unpickle the global {e} (this reader loads only tensors, "
            "numbers, strings and dicts/lists/tuples, and runs no code from the file): "
            "re-save the state dict alone, torch.save(checkpoint['model'], f), or convert it "
            "to .safetensors") from None
      except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
              IndexError, KeyError) as e:
        raise PthError(f"{path}: unreadable torch.save pickle ({type(e).__name__}: "
                         f"{e})") from None
