"""Two processes x two fake CPU devices on 127.0.0.1 run the main job like one 4-device process.

The pair is started by launch/local_multiprocess.sh (jax.distributed on localhost, each
process reading its own share of the digits train split) and runs every stage: SimMIM
pretraining, fine-tuning from the pretrained encoder, evaluation. This file, run as a script in
one process with 4 devices, is the reference: the same models and optimizers fed the same
global batches (both processes' shares, concatenated in process order; the SimMIM masks are
drawn per example from (seed, process, position), so both see the same masks), then the pair's
saved encoder and last checkpoint restored onto its 4 devices and evaluated through the
eval-only path.
"""

import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, child_env, config_args, load_config  # tests/ is on sys.path, as a script too

LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2

# Overrides of configs/digits.py:tiny, given to the pair on the command line and applied to
# the reference's config: a one-stage model, SimMIM pretraining, fine-tuning from its encoder,
# evaluation; a loss logged every step and one checkpoint at the end of each training stage.
# lr 1e-2 from the first step moves the parameters ~1e-2, so a 1e-5 agreement means something.
OVERRIDES = {
    "model.embed_dim": 16, "model.depths": (2,), "model.num_heads": (1,),
    "stages": ("pretrain", "finetune", "eval"),
    "pretrain.steps": 4, "pretrain.warmup_steps": 0, "pretrain.base_lr": 0.32,
    "pretrain.log_every": 1, "pretrain.checkpoint_every": 4,
    "finetune.init": "pretrain", "finetune.pretrained_window_sizes": 4,
    "finetune.steps": 4, "finetune.warmup_steps": 0, "finetune.base_lr": 0.32,
    "finetune.log_every": 1, "finetune.checkpoint_every": 4,
}


def digits_tiny_config(data_dir: str):
  config = load_config("digits.py", "tiny")
  config.update_from_flattened_dict(dict(OVERRIDES, **{"data.data_dir": data_dir}))
  return config


def _flat(tree) -> np.ndarray:
  import jax
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------
# Reference: one process, 4 devices (run as a script).
# ---------------------------------------------------------------------------------------------
def _train(config, trainer, layout, shares, state):
  """`steps` updates of a trainer on the global batches made of both processes' shares, in
  process order (the mesh lists process 0's devices first), as the pair's job runs them."""
  import jax
  from swinv2_jax import sharding
  from swinv2_jax import trainer as trainer_lib
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=layout.replicated())()
  step = trainer_lib.compile_step(trainer, trainer_lib.trainer_batch(config, trainer))
  losses = []
  for _ in range(trainer.task.stage_cfg.steps):
    parts = [next(it) for it in shares]
    local = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    state, metrics = step(state, sharding.global_microbatches(local, layout, trainer.accum_steps),
                          rng)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


def _reference(data_dir: str, workdir: str, out: str):
  import jax
  from swinv2_jax import data as data_lib
  from swinv2_jax import train
  from swinv2_jax import trainer as trainer_lib

  assert jax.process_count() == 1 and jax.device_count() == 4, jax.devices()
  config = digits_tiny_config(data_dir)
  num_classes = data_lib.dataset_info(config.data).num_classes
  layout = trainer_lib.make_layout(config)
  shares = lambda kind, s, **kw: [data_lib.build_train_iterator(
      config.data, kind=kind, image_size=s.img_size, global_batch_size=s.batch_size,
      seed=config.seed, process_index=p, process_count=NUM_PROCESSES, **kw)
                                  for p in range(NUM_PROCESSES)]
  results = {}

  # SimMIM pretraining, each process's share with its own masks.
  p = config.pretrain
  mask_cfg = dict(mask_patch_size=p.mask_patch_size, model_patch_size=config.model.patch_size,
                  mask_ratio=p.mask_ratio)
  trainer = trainer_lib.make_trainer(config, trainer_lib.simmim_task(config), layout)
  state = trainer.init()
  results["pre_initial"] = _flat(state["params"])
  state, results["pre_loss"] = _train(config, trainer, layout,
                                      shares("simmim", p, mask_cfg=mask_cfg), state)
  encoder = state["params"]["encoder"]
  results["pre_params"] = _flat(state["params"])
  results["encoder"] = _flat(encoder)
  # The encoder the pair saved, loaded as the job's fine-tuning does.
  results["pair_encoder"] = _flat(train.finetune_init_params(config, workdir, num_classes, layout))

  # Fine-tuning from this process's own pretrained encoder (the head stays as initialised).
  trainer = trainer_lib.make_trainer(config, trainer_lib.finetune_task(config, num_classes), layout)
  state = trainer.init()
  params = jax.device_put(dict(state["params"], **encoder), trainer.state_shardings["params"])
  state = dict(state, params=params)
  results["initial"] = _flat(state["params"])
  state, results["loss"] = _train(config, trainer, layout,
                                  shares("supervised", config.finetune), state)
  results["params"] = _flat(state["params"])

  # The pair's checkpoint, restored onto this process's 4 devices.
  results["restored"] = _flat(train.load_eval_params(config, workdir, num_classes, layout)[0])
  # And the whole eval-only path of the main job on it.
  config.eval_only = True
  results["eval"] = json.dumps(train.run(config, workdir))
  np.savez(out, **results)


# ---------------------------------------------------------------------------------------------
# The test.
# ---------------------------------------------------------------------------------------------
def _run(cmd, env, timeout, what):
  """Runs `cmd` in its own process group, so a hang can be ended with all it started."""
  child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True, cwd=ROOT)
  try:
    log, _ = child.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    log, _ = child.communicate()
    pytest.fail(f"{what} ran past {timeout} s:\n{log[-4000:]}")
  assert child.returncode == 0, f"{what} failed (exit {child.returncode}):\n{log[-6000:]}"
  return log


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The digits set prepared once here, so the processes only read it."""
  from swinv2_jax import data as data_lib
  path = str(tmp_path_factory.mktemp("tfds"))
  cfg = digits_tiny_config(path).data
  assert data_lib.dataset_info(cfg).num_train_examples == 1437
  return path


def test_two_processes_match_one_and_their_checkpoint_restores_on_one(data_dir, tmp_path):
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  overrides = dict(OVERRIDES, **{"data.data_dir": data_dir})
  cmd = [LAUNCHER, str(NUM_PROCESSES), str(DEVICES_PER_PROCESS), "--config=configs/digits.py:tiny",
         f"--workdir={workdir}"] + config_args(overrides)
  _run(cmd, dict(child_env(), LOG_DIR=logs), timeout=300, what="the 2-process main job")
  for p in range(NUM_PROCESSES):
    with open(os.path.join(logs, f"process_{p}.log")) as f:
      assert f"process {p} of {NUM_PROCESSES}, {DEVICES_PER_PROCESS} local / 4 global" in f.read()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  pair_losses = {stage: [r["loss"] for r in records if r["stage"] == stage]
                 for stage in ("pretrain", "finetune")}
  # finetune.eval_every=3 of the tiny config: the test split evaluated on both processes.
  assert [r["step"] for r in records if r["stage"] == "eval"] == [3]
  with open(os.path.join(workdir, "eval.json")) as f:
    pair_eval = json.load(f)
  for stage in ("pretrain", "finetune"):
    assert sorted(os.listdir(os.path.join(workdir, stage, "checkpoints"))) == ["4"]

  out = str(tmp_path / "reference.npz")
  _run([sys.executable, os.path.abspath(__file__), "--data-dir", data_dir, "--workdir", workdir,
        "--out", out], child_env("--xla_force_host_platform_device_count=4"), timeout=300,
       what="the 1-process reference")
  ref = np.load(out)

  # SimMIM on two processes: the same losses (same images, same masks), and the encoder the
  # pair saved for fine-tuning equals the reference's after the same steps.
  np.testing.assert_allclose(pair_losses["pretrain"], ref["pre_loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(ref["pair_encoder"], ref["encoder"], rtol=0, atol=1e-5)
  assert np.max(np.abs(ref["pre_params"] - ref["pre_initial"])) > 1e-3  # the steps did train
  # Fine-tuning from that encoder.
  np.testing.assert_allclose(pair_losses["finetune"], ref["loss"], rtol=0, atol=1e-5)
  # The pair's final parameters (saved by both processes, restored here on 4 devices) equal
  # the reference's after the same steps.
  np.testing.assert_allclose(ref["restored"], ref["params"], rtol=0, atol=1e-5)
  assert np.max(np.abs(ref["params"] - ref["initial"])) > 1e-3  # the steps did train
  single_eval = json.loads(str(ref["eval"]))
  assert single_eval["num_examples"] == pair_eval["num_examples"] == 360
  assert single_eval["checkpoint"] == pair_eval["checkpoint"]
  # Same parameters, same examples: at most a near-tie may flip between the two runs.
  for key in ("top1", "top5"):
    assert abs(single_eval[key] - pair_eval[key]) <= 1 / 360, (key, single_eval, pair_eval)


def _start_up(monkeypatch, coordinator_address="", **env):
  """The arguments swinv2_jax.distributed.initialize gives jax.distributed.initialize."""
  import jax
  import ml_collections
  from swinv2_jax import distributed
  for key in list(os.environ):
    if key.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "TPU_")) or \
        key == "CUDA_VISIBLE_DEVICES":
      monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  calls = []

  def initialize(*args, heartbeat_timeout_seconds, **kwargs):
    assert heartbeat_timeout_seconds == 30  # config.distributed.heartbeat_timeout_s, every way
    calls.append((args, kwargs))

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  cfg = ml_collections.ConfigDict(dict(coordinator_address=coordinator_address,
                                       num_processes=0, process_id=-1, heartbeat_timeout_s=30))
  distributed.initialize(cfg)
  return calls


def test_start_up_order_of_precedence(monkeypatch):
  slurm = dict(SLURM_JOB_ID="7", SLURM_NTASKS="16", SLURM_STEP_NUM_NODES="2",
               SLURM_PROCID="3", SLURM_LOCALID="3")
  assert _start_up(monkeypatch) == []  # nothing set: one process
  assert _start_up(monkeypatch, **slurm) == [((), dict(local_device_ids=None))]
  # The local / Kubernetes launchers' variables win over a surrounding SLURM allocation.
  local = dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:5", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  assert _start_up(monkeypatch, **local, **slurm) == [(("127.0.0.1:5", 2, 1), {})]
  assert _start_up(monkeypatch, "auto") == [((), dict(local_device_ids=None))]


def test_slurm_tasks_get_the_gpus_they_see(monkeypatch):
  # One task per GPU: JAX's own choice (GPU SLURM_LOCALID).
  per_gpu = dict(SLURM_JOB_ID="7", SLURM_NTASKS="16", SLURM_STEP_NUM_NODES="2",
                 CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert _start_up(monkeypatch, **per_gpu) == [((), dict(local_device_ids=None))]
  per_node = dict(per_gpu, SLURM_NTASKS="2")
  assert _start_up(monkeypatch, **per_node) == [((), dict(local_device_ids=list(range(8))))]
  bound = dict(per_gpu, CUDA_VISIBLE_DEVICES="5")  # --gpus-per-task=1: the task sees one
  assert _start_up(monkeypatch, **bound) == [((), dict(local_device_ids=[0]))]
  no_cuda_list = dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_NNODES="2",
                      SLURM_GPUS_ON_NODE="4")
  assert _start_up(monkeypatch, **no_cuda_list) == [((), dict(local_device_ids=[0, 1, 2, 3]))]


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  _reference(args.data_dir, args.workdir, args.out)
