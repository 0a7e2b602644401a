"""The torch-free .pth reader (swinv2_jax/weights/pth.py): the committed torch.save fixture read
without torch, refusal of pickles that would run code (and that they run none), tensor
geometry checks, and, where torch is installed, agreement with torch.load."""

import builtins
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import errors
from swinv2_jax import weights
from swinv2_jax.weights import pth

from parity_fixtures import FIXTURE_DIR, abstract_model, config, fixture, state

PTH_FIXTURE = os.path.join(FIXTURE_DIR, "swinv2_shift_clamp.pth")
LOGIT_TOL = 1e-4  # as tests/test_parity.py: the fixtures' own float32 error is up to 3.7e-5


def expected_extras() -> dict:
  """tests/make_parity_fixtures.py `pth_extras`, rebuilt in numpy."""
  base = np.arange(24, dtype=np.float32).reshape(4, 6) / 4
  out = {"float32": base, "transposed": base.T, "sliced": base[1:3, 2:],
         "float64": base.astype(np.float64), "float16": base.astype(np.float16),
         "bfloat16": base.astype(ml_dtypes.bfloat16), "bool": base > 2,
         "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.float32),
         "parameter": base[0]}
  for dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8):
    out[np.dtype(dtype).name] = (base * 4).astype(dtype)
  return out


def assert_same_arrays(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, v.dtype)
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_committed_fixture_reads_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
  raw = pth.read_pth(PTH_FIXTURE)
  assert (raw["epoch"], raw["max_accuracy"]) == (299, 81.25)
  assert raw["notes"] == ["official layout", ("shift_clamp", 4), None, True]
  assert raw["model"]._metadata == {"": {"version": 1}}  # state_dict()'s, via pickle's BUILD
  assert_same_arrays(dict(raw["model"]), state("shift_clamp", "official"))
  assert_same_arrays(raw["dtypes"], expected_extras())

  # The official checkpoint's {'model': ...} unwrapped, buffers ignored: the reference logits.
  model = weights.load_pytorch_weights(abstract_model(config("shift_clamp")), PTH_FIXTURE)
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, fixture("shift_clamp")["input_nhwc"])
  np.testing.assert_allclose(np.asarray(logits), fixture("shift_clamp")["logits"], rtol=0,
                             atol=LOGIT_TOL)


# ---------------------------------------------------------------------------------------------
# Files that must be refused.
# ---------------------------------------------------------------------------------------------
def write_pth(path, pickled: bytes, storages=None) -> str:
  """A zip as torch.save lays it out: <name>/data.pkl, <name>/data/<key>, <name>/byteorder."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickled)
    archive.writestr("archive/byteorder", "little")
    for key, raw in (storages or {}).items():
      archive.writestr(f"archive/data/{key}", raw)
  return str(path)


class Gadget:
  """A pickle that calls `func(*args)` when a plain unpickler loads it."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec"])
def test_pickles_that_run_code_are_refused_and_run_nothing(name, tmp_path):
  marker = tmp_path / "ran"
  gadget = {"os.system": Gadget(os.system, f"touch {marker}"),
            "builtins.eval": Gadget(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
            "builtins.exec": Gadget(builtins.exec, f"open({str(marker)!r}, 'w').close()")}[name]
  # Hidden where a state dict's tensor would be, as in a doctored official checkpoint.
  pickled = pickle.dumps({"model": {"head.weight": gadget}, "epoch": 3}, protocol=2)
  pickle.loads(pickled)  # the plain unpickler runs it: the gadget is real
  assert marker.exists()
  marker.unlink()

  path = write_pth(tmp_path / "evil.pth", pickled)
  with pytest.raises(pth.UnsafePickleError) as info:
    weights.load_pytorch_weights(abstract_model(config("shift_clamp")), path)
  assert not marker.exists()
  # As the file names it: os.system is posix.system; protocol 2 (torch.save's) writes
  # Python 2's module name for builtins.
  global_name = {"os.system": f"{os.system.__module__}.system"}.get(
      name, name.replace("builtins.", "__builtin__."))
  message = errors.message(info.value)
  assert f"refused to unpickle the global {global_name} " in message
  assert message.startswith(path) and "\n" not in message and errors.is_user_error(info.value)


def tensor_pickle(numel, offset, size, stride, storage="FloatStorage") -> bytes:
  """The protocol-2 pickle torch.save writes for one tensor, opcode by opcode: _rebuild_tensor_v2
  (persistent id ('storage', torch.<storage>, '0', 'cpu', numel), offset, size, stride, False,
  None)."""
  text = lambda s: b"X" + struct.pack("<I", len(s)) + s.encode()
  ints = lambda values: b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"
  storage_id = (b"(" + text("storage") + f"ctorch\n{storage}\n".encode() + text("0")
                + text("cpu") + b"K" + bytes([numel]) + b"t")
  return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + storage_id + b"Q" + b"K"
          + bytes([offset]) + ints(size) + ints(stride) + b"\x89Nt" + b"R.")


def test_tensor_geometry_and_storages_are_checked(tmp_path):
  data = np.arange(6, dtype=np.float32)
  good = write_pth(tmp_path / "good.pth", tensor_pickle(6, 1, (2, 2), (3, 1)),
                   {"0": data.tobytes()})
  np.testing.assert_array_equal(pth.read_pth(good), [[1, 2], [4, 5]])

  cases = {  # what would read memory past the storage, or a storage of another size
      "past": (tensor_pickle(6, 2, (2, 3), (3, 1)), data, "reaches past its storage of 6"),
      "short": (tensor_pickle(6, 0, (6,), (1,)), data[:5], "has 20 bytes, not 6 x 4"),
      "type": (tensor_pickle(6, 0, (6,), (1,), storage="ComplexFloatStorage"), data,
               "refused to unpickle the global torch.ComplexFloatStorage"),
  }
  for name, (pickled, storage, message) in cases.items():
    path = write_pth(tmp_path / f"{name}.pth", pickled, {"0": storage.tobytes()})
    with pytest.raises(pth.PthError, match=message):
      pth.read_pth(path)
  with pytest.raises(pth.PthError, match="no storage entry archive/data/0"):
    pth.read_pth(write_pth(tmp_path / "missing.pth", tensor_pickle(6, 0, (6,), (1,))))
  legacy = tmp_path / "legacy.pth"  # torch < 1.6 wrote a bare pickle stream
  legacy.write_bytes(pickle.dumps({"model": {}}, protocol=2))
  with pytest.raises(pth.PthError, match="not a torch.save zip .*legacy torch < 1.6"):
    pth.read_pth(str(legacy))


# ---------------------------------------------------------------------------------------------
# Against torch itself, where it is installed (never in CI: torch is not a dependency).
# ---------------------------------------------------------------------------------------------
def _as_numpy(value):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(value, torch.Tensor):
    value = value.detach()
    return (value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
            else value.numpy())
  if isinstance(value, dict):  # OrderedDict stays OrderedDict
    return type(value)((k, _as_numpy(v)) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return type(value)(_as_numpy(v) for v in value)
  return value


def _assert_same(ours, theirs, where="checkpoint"):
  assert type(ours) is type(theirs), where  # noqa: E721
  if isinstance(theirs, np.ndarray):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
    np.testing.assert_array_equal(ours, theirs, err_msg=where)
  elif isinstance(theirs, dict):
    assert list(ours) == list(theirs), where
    for k in theirs:
      _assert_same(ours[k], theirs[k], f"{where}.{k}")
  elif isinstance(theirs, (list, tuple)):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      _assert_same(a, b, f"{where}[{i}]")
  else:
    assert ours == theirs, where


def test_reader_agrees_with_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.LayerNorm(4),
                               torch.nn.Linear(4, 5))
  big = torch.randn(64, 48)
  checkpoint = {
      "model": module.state_dict(),
      "half": module.half().state_dict(),
      "bf16": {k: v.bfloat16() for k, v in module.state_dict().items()},
      "views": {"t": big.t(), "rows": big[3:9], "cols": big[:, 5:7], "strided": big[::4, ::3]},
      "ints": torch.arange(10), "mask": big > 0, "scalar": torch.tensor(2.5),
      "params": module.float().state_dict(keep_vars=True),
      "epoch": 7, "lr": 1e-3, "history": [0.5, (1, "a")], "none": None,
  }
  path = str(tmp_path / "from_torch.pth")
  torch.save(checkpoint, path)
  _assert_same(pth.read_pth(path), _as_numpy(torch.load(path, weights_only=True)))

  # Not a state dict: an object torch would rebuild by calling its class.
  import argparse  # pylint: disable=g-import-not-at-top
  torch.save({"model": module.state_dict(), "args": argparse.Namespace(lr=1)}, path)
  with pytest.raises(pth.UnsafePickleError, match="the global argparse.Namespace "):
    pth.read_pth(path)
  torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
  with pytest.raises(pth.PthError, match="legacy"):
    pth.read_pth(path)
