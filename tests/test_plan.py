"""The dry run (swinv2_jax.plan): plan.json on 8 fake CPU devices, the ZeRO-3 split of the
parameters, and what remat saves under the memory-optimised scheduler.

Each check runs in a fresh subprocess: the fake device count must be set before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two stages of the tiny G structure: every weight matrix is big enough to be sharded. Remat
# wraps one scanned group of two blocks and saves memory across groups: stage 2 has four
# (as G's stage 3 has seven); measured 245 vs 311 MiB of temporaries.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from swinv2_jax import plan
    sys.path.insert(0, "configs")
    import g_1536

    def config(remat):
      c = g_1536.get_config("tiny")
      c.model.depths, c.model.num_heads, c.model.embed_dim = (2, 8), (4, 8), 128
      c.model.remat, c.model.attention_chunks = remat, (4, 2)
      c.finetune.img_size, c.finetune.window_size, c.finetune.pretrained_window_sizes = 256, 8, 4
      c.pretrain.img_size, c.pretrain.window_size = 64, 4
      c.mesh.zero_stage, c.plan.num_devices, c.plan.per_device_batch = 3, 8, 1
      return c

    out = sys.argv[1]
    plan.dry_run(config("full"), out + "/full")
    plan.dry_run(config("none"), out + "/none")
""")


def _run(code, *args):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  out = tmp_path_factory.mktemp("plans")
  result = _run(_SCRIPT, str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "memory-optimised CPU scheduler" in result.stdout
  return {name: json.loads((out / name / "plan.json").read_text()) for name in ("full", "none")}


def test_plan_json_has_the_required_keys(plans):
  plan = plans["full"]
  for key in ("params", "flops_per_step", "mesh", "per_device_bytes"):
    assert key in plan
  for key in ("params", "opt_state", "temp", "total"):
    assert plan["per_device_bytes"][key] > 0
  b = plan["per_device_bytes"]
  assert b["total"] == b["params"] + b["opt_state"] + b["temp"]
  assert plan["mesh"] == {"data": 8}
  assert plan["global_batch"] == 8
  assert plan["settings"]["scheduler"] == "memory-optimised"
  assert plan["flops_per_step"] > 0


def test_zero3_shards_parameters_over_the_eight_devices(plans):
  plan = plans["full"]
  whole = plan["params"] * 4  # float32 parameters
  per_device = plan["per_device_bytes"]["params"]
  # Norms, biases and the CPB MLPs stay replicated (too small to shard): a few percent more.
  assert whole / 8 <= per_device < 1.2 * whole / 8
  # AdamW's two moments, sharded alike.
  assert per_device * 1.8 < plan["per_device_bytes"]["opt_state"] < per_device * 2.2


def test_remat_lowers_the_temporaries(plans):
  full, none = plans["full"]["per_device_bytes"], plans["none"]["per_device_bytes"]
  assert full["params"] == none["params"]
  assert full["temp"] < 0.85 * none["temp"], (full["temp"], none["temp"])


def test_dry_run_refuses_a_backend_started_with_other_devices():
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_platforms", "cpu")
      jax.devices()  # starts the backend with one CPU device
      from swinv2_jax import plan
      try:
        plan.use_fake_cpu_devices(8)
      except plan.DeviceSetupError as e:
        print("refused:", e)
  """)
  result = _run(code)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "refused:" in result.stdout and "not 8" in result.stdout


@pytest.mark.slow
def test_giant_1536_fits_40_gb_on_eight_devices(tmp_path):
  """The real G-1536 plan (minutes and ~11 GB of RAM to compile): `-m slow` only."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  result = subprocess.run(
      [sys.executable, "-m", "swinv2_jax.main", "--config=configs/g_1536.py",
       f"--workdir={tmp_path}", "--config.dry_run=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads((tmp_path / "plan.json").read_text())
  per_device = plan["per_device_bytes"]
  assert plan["params"] == 3_001_940_680
  assert per_device["total"] < 40e9, per_device
  assert per_device["params"] == pytest.approx(plan["params"] * 4 / 8, rel=0.05)
