"""`python -m swinv2_jax.benchmark` on a tiny SwinV2 (two levels, 32 px): each mode's JSON
parses and its figures agree with one another and with the analytic FLOPs; ZeRO-3 on two fake
CPU devices; the PyTorch comparison, or its one-line refusal where torch/timm do not import.

Each run is a fresh subprocess (the benchmark sets threads and devices before JAX starts); the
runs share the test suite's persistent compilation cache, so a second run compiles little.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from helpers import ROOT
from swinv2_jax import benchmark
from swinv2_jax import hugepages
from swinv2_jax.models import complexity

TINY = dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
TINY_FLAGS = ["--img_size=32", "--window_size=4", "--embed_dim=16", "--depths=2,2",
              "--num_heads=1,2", "--batch=4", "--iters=2", "--warmup=1"]


def _run(*args, timeout=240):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cache = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, "-m", "swinv2_jax.benchmark", *TINY_FLAGS, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _json(*args) -> dict:
  result = _run("--json", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)  # one object, nothing else on stdout


def _check_figures(out: dict, mode: str, num_classes: int = 1000):
  s = out["settings"]
  assert (s["mode"], s["batch"], s["iters"], s["warmup"]) == (mode, 4, 2, 1)
  assert (s["img_size"], s["window_size"], s["embed_dim"]) == (32, 4, 16)
  assert tuple(s["depths"]) == (2, 2) and tuple(s["num_heads"]) == (1, 2)
  macs = complexity.count_macs("swinv2_tiny_window8_256", **TINY,
                               num_classes=0 if mode == "simmim" else num_classes)
  assert out["flops_per_image"] == 2 * macs * (1 if mode == "forward" else 3)
  assert out["flops_per_step"] == out["flops_per_image"] * 4
  assert len(out["step_times_s"]) == 2 and min(out["step_times_s"]) > 0
  assert out["step_s"] == pytest.approx(sorted(out["step_times_s"])[0] / 2
                                        + sorted(out["step_times_s"])[1] / 2)
  assert out["images_per_s"] > 0 and out["images_per_s_mean"] > 0
  assert out["images_per_s"] == pytest.approx(4 / out["step_s"])
  assert out["images_per_s_mean"] == pytest.approx(8 / sum(out["step_times_s"]))
  assert out["tflops"] == pytest.approx(out["flops_per_image"] * out["images_per_s"] / 1e12,
                                        rel=1e-9)
  assert out["compile_s"] > 0 and 0 < out["lower_s"] <= out["compile_s"]
  assert out["params"] > 0 and out["cores_busy"] > 0
  m = out["memory"]
  assert m["temp"] > 0 and m["arguments"] > 0 and m["params"] > 0
  assert s["platform"] == "cpu"
  return s, m


def test_forward_figures_and_mfu_against_a_given_peak():
  out = _json("--mode=forward", "--peak_tflops=2.5")
  s, m = _check_figures(out, "forward")
  assert out["peak_tflops"] == 2.5 and out["peak_source"] == "--peak_tflops"
  # Re-executed with glibc's huge-page tunable wherever glibc and the kernel can use it.
  assert s["huge_pages"] == (hugepages.active() or hugepages.possible())
  assert out["mfu"] == pytest.approx(out["tflops"] / 2.5)
  assert m["opt_state"] == 0 and m["params"] == 4 * out["params"]  # float32, one device
  assert s["mesh"] == {"data": 1} and s["num_devices"] == 1


def test_train_figures_and_no_mfu_on_cpu():
  out = _json("--mode=train")
  _, m = _check_figures(out, "train")
  assert out["peak_tflops"] is None and out["mfu"] is None  # a CPU has no known peak
  assert m["params"] == 4 * out["params"] and m["opt_state"] >= 2 * m["params"]  # Adam mu, nu
  assert m["aliased"] > 0  # the train state is donated


def test_simmim_figures():
  out = _json("--mode=simmim", "--nohuge_pages")
  _check_figures(out, "simmim")
  assert out["settings"]["huge_pages"] == hugepages.active()  # as this process was
  assert out["settings"]["num_classes"] == 0


def test_train_zero3_on_two_fake_devices():
  out = _json("--mode=train", "--fake_devices=2", "--mesh=data=2", "--zero=3")
  s, m = _check_figures(out, "train")
  assert s["mesh"] == {"data": 2} and s["num_devices"] == 2 and s["zero"] == 3
  assert s["scheduler"] == "memory-optimised"
  # ZeRO-3: each device holds part of the parameters (the 32 x 1000 head is split in two).
  assert m["params"] < 4 * out["params"]


def _imports_torch_and_timm(python: str) -> bool:
  # Installed is not enough: timm's import can fail inside a mismatched torchvision.
  return subprocess.run([python, "-c", "import torch, timm"], capture_output=True).returncode == 0


def _check_comparison(out: dict):
  ref = out["compare"]["timm"]
  assert ref["params"] == out["params"]  # the same architecture on both sides
  assert ref["eager"]["images_per_s"] > 0 and "compiled" not in ref
  assert out["compare"]["ratio"]["eager"] == pytest.approx(
      out["images_per_s"] / ref["eager"]["images_per_s"])


def test_compare_timm_or_its_one_line_refusal():
  importable = all(importlib.util.find_spec(name) for name in ("torch", "timm")) and (
      _imports_torch_and_timm(sys.executable))
  if importable:
    _check_comparison(_json("--mode=forward", "--compare=timm", "--notimm_compile"))
  else:
    result = _run("--compare=timm")
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compare=timm needs torch and timm")


def test_compare_timm_in_another_python():
  """--torch_python runs the PyTorch side in its own interpreter: $SWINV2_TORCH_PYTHON (a venv
  with torch and timm) where set, else this one, which is refused in one line without them."""
  python = os.environ.get("SWINV2_TORCH_PYTHON", sys.executable)
  if _imports_torch_and_timm(python):
    _check_comparison(_json("--mode=train", "--compare=timm", "--notimm_compile",
                            f"--torch_python={python}"))
  else:
    result = _run("--compare=timm", f"--torch_python={python}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --torch_python={python}: cannot import torch and timm")


def test_bad_options_are_one_line():
  for args, text in ((["--attention_impl=flash"], "one of xla, cudnn, auto"),
                     (["--attention_impl=cudnn", "--dtype=bfloat16"], "needs a CUDA GPU"),
                     (["--torch_python=python3"], "add it"),
                     (["--mode=train", "--accum_steps=3"], "not a multiple"),
                     (["--mesh=data"], "axis=size")):
    result = _run(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and text in lines[0], result.stderr


def test_device_kinds_map_to_known_peaks():
  assert benchmark.accelerator_key("NVIDIA H100 80GB HBM3") == "h100"
  assert benchmark.accelerator_key("NVIDIA H200") == "h200"
  assert benchmark.accelerator_key("NVIDIA A100-SXM4-80GB") == "a100-80g"
  assert benchmark.accelerator_key("NVIDIA A100-SXM4-40GB") == "a100-40g"
  assert benchmark.accelerator_key("TPU v5 lite") == "v5e"
  assert benchmark.accelerator_key("TPU v5p") == "v5p"
  assert benchmark.accelerator_key("TPU v4") == "v4"
  assert benchmark.accelerator_key("cpu") is None
  assert benchmark.parse_mesh("data=4,fsdp=2") == (("data", "fsdp"), (4, 2))
