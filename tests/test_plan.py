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

from helpers import ROOT

# Two stages of the tiny G structure: every weight matrix is big enough to be sharded. Remat
# wraps one scanned group of six blocks (G's extra-norm period) and saves memory across groups:
# level 2 has two and a tail of two (as G's level 3 has seven groups). Without remat its two
# groups are unrolled (swinv2.UNROLLED_GROUPS), which keeps fewer copies than a scan would.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from swinv2_jax import plan
    sys.path.insert(0, "tests")
    from helpers import load_config

    def config(remat):
      c = load_config("g_1536.py", "tiny")
      c.model.depths, c.model.num_heads, c.model.embed_dim = (2, 12), (4, 8), 128
      c.model.remat, c.model.attention_chunks = remat, (4, 2)
      c.finetune.img_size, c.finetune.window_size, c.finetune.pretrained_window_sizes = 256, 8, 4
      c.finetune.batch_size, c.finetune.accum_steps = 8, 1
      c.pretrain.img_size, c.pretrain.window_size = 64, 4
      c.pretrain.batch_size, c.pretrain.accum_steps = 32, 2
      c.eval.batch_size = 16
      c.mesh.zero, c.plan.num_devices = 3, 8
      c.plan.accelerator, c.plan.mfu = "h100", 0.5
      return c

    out = sys.argv[1]
    plan.dry_run(config("full"), out + "/full")
    c = config("none")
    c.stages = ("finetune",)
    plan.dry_run(c, out + "/none")
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


def test_every_stage_is_planned_at_its_own_size_batch_and_accumulation(plans):
  stages = plans["full"]["stages"]
  assert list(stages) == ["pretrain", "finetune", "eval"]
  for name, entry in stages.items():
    for key in ("stage", "global_batch", "accum_steps", "microbatch_per_device", "mesh",
                "params", "flops_per_step", "per_device_bytes"):
      assert key in entry, (name, key)
    assert entry["mesh"] == {"data": 8}
    assert entry["settings"]["scheduler"] == "memory-optimised"
    b = entry["per_device_bytes"]
    assert b["params"] > 0 and b["temp"] > 0
  pre, fine, ev = stages["pretrain"], stages["finetune"], stages["eval"]
  # 32 = 2 x 2 x 8 and 8 = 1 x 1 x 8; the eval batch of 16 is 2 per device.
  assert (pre["accum_steps"], pre["microbatch_per_device"]) == (2, 2)
  assert (fine["accum_steps"], fine["microbatch_per_device"]) == (1, 1)
  assert ev["microbatch_per_device"] == 2
  # Evaluation holds the parameters sharded as fine-tuning does (ZeRO-3: about an eighth on
  # each device), not whole on every device.
  assert ev["per_device_bytes"]["params"] == fine["per_device_bytes"]["params"]
  assert (pre["settings"]["img_size"], fine["settings"]["img_size"]) == (64, 256)
  # Model FLOPs scale with pixels x batch (64 px x 32 vs 256 px x 8: a quarter; SimMIM has
  # no head), both x3 for training; eval is the forward alone.
  assert fine["params"] == ev["params"] != pre["params"]  # SimMIM: decoder, no head
  assert 0.1 < pre["flops_per_step"] / fine["flops_per_step"] < 0.5
  assert ev["flops_per_step"] == pytest.approx(fine["flops_per_step"] / 3 * 16 / 8, rel=1e-6)


def test_wall_time_estimate_follows_the_accelerator_and_mfu(plans):
  fine = plans["full"]["stages"]["finetune"]
  e = fine["estimate"]
  step_s = fine["flops_per_step"] / (8 * 989e12 * 0.5)
  assert (e["accelerator"], e["mfu"]) == ("h100", 0.5)
  assert e["step_s"] == pytest.approx(step_s, rel=1e-9)
  assert e["device_days"] == pytest.approx(step_s * fine["steps"] * 8 / 86400, rel=1e-9)


def test_zero3_shards_parameters_over_the_eight_devices(plans):
  fine = plans["full"]["stages"]["finetune"]
  whole = fine["params"] * 4  # float32 parameters
  per_device = fine["per_device_bytes"]["params"]
  # Norms, biases and the CPB MLPs stay replicated (too small to shard): a few percent more.
  assert whole / 8 <= per_device < 1.2 * whole / 8
  # AdamW's two moments, sharded alike.
  assert per_device * 1.8 < fine["per_device_bytes"]["opt_state"] < per_device * 2.2


def test_remat_lowers_the_temporaries(plans):
  full = plans["full"]["stages"]["finetune"]["per_device_bytes"]
  none = plans["none"]["stages"]["finetune"]["per_device_bytes"]
  assert list(plans["none"]["stages"]) == ["finetune"]
  assert full["params"] == none["params"]
  assert full["temp"] < 0.85 * none["temp"], (full["temp"], none["temp"])


_AUTO = textwrap.dedent("""
    import json, sys
    from swinv2_jax import config as config_lib, plan, trainer as trainer_lib
    sys.path.insert(0, "tests")
    from helpers import load_config
    devices = plan.use_fake_cpu_devices(8)
    c = load_config("digits.py", "tiny")
    c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (2, 2), (1, 2)
    c.pretrain.batch_size, c.pretrain.accum_steps = 32, "auto"  # 4 per device: 1, 2 or 4
    layout = trainer_lib.make_layout(c, devices)
    task = trainer_lib.simmim_task(c)
    chosen = {}
    trainer, compiled = plan.fit_accum_steps(c, task, layout, budget_bytes=1e12)
    chosen["roomy"] = trainer.accum_steps
    micro_one = trainer_lib.make_trainer(c, task, layout, 4)  # microbatches of 1 image
    one = plan.memory_summary(trainer_lib.compile_step(
        micro_one, trainer_lib.trainer_batch(c, micro_one)), micro_one)["total"]
    trainer, _ = plan.fit_accum_steps(c, task, layout, budget_bytes=one + 1)
    chosen["tight"] = trainer.accum_steps
    try:
      plan.fit_accum_steps(c, task, layout, budget_bytes=one - 1)
    except plan.DoesNotFitError as e:
      chosen["none"] = str(e)
    print(json.dumps(chosen))
""")


def test_auto_accumulation_picks_the_largest_microbatch_that_fits():
  result = _run(_AUTO)
  assert result.returncode == 0, result.stderr[-3000:]
  chosen = json.loads(result.stdout.strip().splitlines()[-1])
  assert chosen["roomy"] == 1  # 4 images per device in one microbatch
  assert chosen["tight"] == 4  # only a microbatch of 1 fits: 4 of them
  assert "pretrain.accum_steps='auto'" in chosen["none"] and "GiB" in chosen["none"]


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
  """The real G-1536 plan, both stages and eval as shipped (about 5 minutes and 2 GB of RAM on
  two cores): `-m slow` only."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
  result = subprocess.run(
      [sys.executable, "-m", "swinv2_jax.main", "--config=configs/g_1536.py",
       f"--workdir={tmp_path}", "--config.dry_run=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads((tmp_path / "plan.json").read_text())
  stages = plan["stages"]
  assert list(stages) == ["pretrain", "finetune", "eval"]
  assert plan["fits"] and plan["plan_s"] < 600
  for name, entry in stages.items():
    assert entry["per_device_bytes"]["total"] <= 40 * 2**30, (name, entry["per_device_bytes"])
  fine = stages["finetune"]
  assert fine["params"] == 3_001_940_680
  assert (fine["global_batch"], stages["pretrain"]["global_batch"]) == (576, 9216)
  assert fine["per_device_bytes"]["params"] == pytest.approx(fine["params"] * 4 / 8, rel=0.05)
  # Pretraining's accum_steps='auto': the largest microbatch that fits; fine-tuning's 72 x 1.
  pre = stages["pretrain"]
  assert pre["accum_steps"] * pre["microbatch_per_device"] * 8 == 9216
  assert pre["microbatch_per_device"] > 1
  assert (fine["accum_steps"], fine["microbatch_per_device"]) == (72, 1)
