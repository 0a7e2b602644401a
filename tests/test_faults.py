"""Faults a long run meets, each with a real signal to a real process: kill -9 mid-step, during
an async save and between stages, SIGTERM (preemption), a damaged newest checkpoint, a
checkpoint of another config, a resume on another process count, and a dead peer.

Each ends in a clear state from which the same command continues, and the continued run's
losses and evaluation equal those of an uninterrupted run.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ROOT, child_env, config_args

# configs/digits.py:tiny, smaller: one model level, 8 steps per stage, checkpoints every 4
# steps, a loss logged every step, an evaluation at fine-tune steps 3 and 6.
OVERRIDES = {
    "model.embed_dim": 16, "model.depths": (2,), "model.num_heads": (1,),
    "stages": ("pretrain", "finetune", "eval"),
    "pretrain.steps": 8, "pretrain.warmup_steps": 1, "pretrain.log_every": 1,
    "pretrain.checkpoint_every": 4,
    "finetune.steps": 8, "finetune.warmup_steps": 1, "finetune.log_every": 1,
    "finetune.checkpoint_every": 4,
}
TIMEOUT = 240  # seconds any one run of the tiny job may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The digits set prepared once here, so that the runs only read it."""
  from swinv2_jax import data as data_lib
  from helpers import load_config
  path = str(tmp_path_factory.mktemp("tfds"))
  cfg = load_config("digits.py", "tiny").data
  cfg.data_dir = path
  data_lib.dataset_info(cfg)
  return path


def _command(workdir, data_dir, **overrides):
  return [sys.executable, "-m", "swinv2_jax.main", "--config=configs/digits.py:tiny",
          f"--workdir={workdir}"] + config_args(
              dict(OVERRIDES, **{"data.data_dir": data_dir}, **overrides))


def _start(cmd, log_path, env=None):
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  child = subprocess.Popen(cmd, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT,
                           cwd=ROOT, start_new_session=True)
  child.log_path = log_path
  return child


def _log(child) -> str:
  with open(child.log_path) as f:
    return f.read()


def _finish(child, timeout=TIMEOUT) -> int:
  try:
    return child.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    pytest.fail(f"ran past {timeout} s:\n{_log(child)[-4000:]}")


def _run(cmd, log_path, env=None) -> str:
  child = _start(cmd, log_path, env)
  code = _finish(child)
  assert code == 0, f"exit {code}:\n{_log(child)[-6000:]}"
  return _log(child)


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _losses(workdir, stage):
  return [(r["step"], r["loss"]) for r in _records(workdir) if r["stage"] == stage]


def _eval(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  return {k: v for k, v in result.items() if k != "checkpoint"}


def _wait_for(child, condition, what, timeout=TIMEOUT, poll=0.002):
  """Polls `condition()` until it holds (True), or fails if the child ends or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return
    if child.poll() is not None:
      pytest.fail(f"the run ended (exit {child.returncode}) before {what}:\n"
                  f"{_log(child)[-4000:]}")
    time.sleep(poll)
  os.killpg(child.pid, signal.SIGKILL)
  pytest.fail(f"no {what} within {timeout} s:\n{_log(child)[-4000:]}")


def _logged(workdir, stage, step):
  return lambda: any(s >= step for s, _ in _losses(workdir, stage))


def _kill9(child) -> None:
  os.killpg(child.pid, signal.SIGKILL)  # the whole group: no grain worker outlives it
  child.wait()
  assert child.returncode == -signal.SIGKILL


def _steps(workdir, stage):
  path = os.path.join(workdir, stage, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run: its losses per stage and step, and its evaluation."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  _run(_command(workdir, data_dir), workdir + ".log")
  return {stage: _losses(workdir, stage) for stage in ("pretrain", "finetune")}, _eval(workdir)


def test_kill9_anywhere_and_sigterm_then_the_same_command_matches_an_uninterrupted_run(
    data_dir, reference, tmp_path):
  """One workdir through a chain of faults, each followed by the same command."""
  workdir = str(tmp_path / "run")
  cmd = _command(workdir, data_dir)
  faults = []

  # 1. kill -9 mid-step: pretraining has logged step 2 and is computing step 3.
  child = _start(cmd, str(tmp_path / "1.log"))
  _wait_for(child, _logged(workdir, "pretrain", 2), "pretrain step 2")
  _kill9(child)
  assert _steps(workdir, "pretrain") == []
  faults.append("kill -9 mid-step (pretrain step 3): no checkpoint yet, the rerun starts over")

  # 2. kill -9 during an async save: orbax writes into a temporary directory, renamed when
  # complete; the kill lands while that directory exists.
  child = _start(cmd, str(tmp_path / "2.log"))
  tmp_dirs = os.path.join(workdir, "pretrain", "checkpoints", "*.orbax-checkpoint-tmp*")
  _wait_for(child, lambda: glob.glob(tmp_dirs), "an async save in progress")
  _kill9(child)
  partial = _steps(workdir, "pretrain")
  faults.append(f"kill -9 during the async save: finished steps {partial}, a temporary "
                f"directory left behind")

  # 3. kill -9 between stages: pretraining's encoder is exported, fine-tuning has not begun.
  child = _start(cmd, str(tmp_path / "3.log"))
  encoder = os.path.join(workdir, "pretrain", "encoder")
  _wait_for(child, lambda: os.path.isdir(encoder), "the pretrained encoder")
  _kill9(child)
  assert _steps(workdir, "finetune") == []
  faults.append("kill -9 between stages (encoder exported, fine-tuning not begun)")

  # 4. SIGTERM mid-stage (a scheduler's preemption notice), to every process of the job as
  # schedulers send it, input workers included: the run saves at the step the signal lands
  # on, says so, and exits 0.
  child = _start(_command(workdir, data_dir, **{"data.num_workers": 1}),
                 str(tmp_path / "4.log"))
  _wait_for(child, _logged(workdir, "finetune", 5), "fine-tune step 5")
  signalled = max(s for s, _ in _losses(workdir, "finetune"))
  start = time.monotonic()
  os.killpg(child.pid, signal.SIGTERM)
  assert _finish(child) == 0, _log(child)[-4000:]
  took = time.monotonic() - start
  saved = _steps(workdir, "finetune")
  assert "preempted (SIGTERM)" in _log(child)
  assert saved[-1] not in (4, 8) and signalled <= saved[-1] <= signalled + 2, (saved, signalled)
  faults.append(f"SIGTERM at fine-tune step {signalled}: checkpoint at step {saved[-1]}, "
                f"exit 0 after {took:.1f} s")

  # 5. The same command once more: it finishes, with the uninterrupted run's numbers.
  log = _run(cmd, str(tmp_path / "5.log"))
  assert f"finetune: resumed from step {saved[-1]}" in log
  losses, result = reference
  for stage in ("pretrain", "finetune"):
    assert _losses(workdir, stage) == losses[stage], stage  # exactly: same steps, same floats
  assert _eval(workdir) == result
  print("\n".join(faults))


def _first_file(directory):
  files = sorted(p for p in glob.glob(os.path.join(directory, "**"), recursive=True)
                 if os.path.isfile(p) and os.path.getsize(p) > 64)
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _first_file(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_data(step_dir):
  os.remove(_first_file(os.path.join(step_dir, "state")))


def _half_written(step_dir):
  # A directory whose `state` item never got its metadata written.
  for name in ("_METADATA", "manifest.ocdbt"):
    path = os.path.join(step_dir, "state", name)
    if os.path.exists(path):
      os.remove(path)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
  """A workdir whose pretraining has checkpoints at steps 4 and 8 (and nothing else)."""
  workdir = str(tmp_path_factory.mktemp("pretrained") / "run")
  _run(_command(workdir, data_dir, stages=("pretrain",)), workdir + ".log")
  assert _steps(workdir, "pretrain") == [4, 8]
  return workdir


@pytest.mark.parametrize("damage", [_truncate, _delete_data, _half_written],
                         ids=["truncated-file", "deleted-file", "half-written"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(
    data_dir, pretrained, tmp_path, damage):
  from swinv2_jax import train
  from helpers import load_config
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  # As if killed after the last save, before the encoder export (else the stage is skipped).
  shutil.rmtree(os.path.join(workdir, "pretrain", "encoder"))
  damage(os.path.join(workdir, "pretrain", "checkpoints", "8"))
  config = load_config("digits.py", "tiny")
  config.update_from_flattened_dict(dict(OVERRIDES, **{"data.data_dir": data_dir}))
  config.stages = ("pretrain",)
  before = {stage: _losses(workdir, stage) for stage in ("pretrain", "finetune")}
  train.run(config, workdir)
  # Nothing deleted: the damaged step sits in pretrain/damaged/, and steps 5-8 were redone.
  (moved,) = glob.glob(os.path.join(workdir, "pretrain", "damaged", "8-*"))
  assert os.listdir(moved)
  assert _steps(workdir, "pretrain") == [4, 8]
  # The redone steps logged the same losses again, once each.
  assert {stage: _losses(workdir, stage) for stage in ("pretrain", "finetune")} == before
  from swinv2_jax import checkpointing
  assert checkpointing.tree_step(os.path.join(workdir, "pretrain", "encoder")) == 8


def test_a_checkpoint_of_another_config_names_the_keys_that_differ(data_dir, pretrained,
                                                                   tmp_path):
  """The workdir's config.json is gone (say, the checkpoints were copied elsewhere): the
  checkpoint's own saved config names what differs, in one line, and nothing is touched."""
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  cmd = _command(workdir, data_dir, stages=("pretrain",), **{"model.embed_dim": 24,
                                                              "pretrain.steps": 12})
  child = _start(cmd, str(tmp_path / "run.log"))
  assert _finish(child) == 2
  lines = [line for line in _log(child).splitlines() if line.startswith("error:")]
  assert len(lines) == 1, _log(child)[-3000:]
  assert "written with another config: model.embed_dim (16 -> 24)" in lines[0], lines[0]
  assert "pretrain.steps" in lines[0] and "cannot be read" not in _log(child)
  assert _steps(workdir, "pretrain") == [4, 8]
  assert not os.path.exists(os.path.join(workdir, "pretrain", "damaged"))
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused before any write


# ---------------------------------------------------------------------------------------------
# Several processes.
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_processes(cmd, count, devices, log_prefix, **env):
  port = _free_port()
  return [_start(cmd, f"{log_prefix}_{i}.log", child_env(
      f"--xla_force_host_platform_device_count={devices}",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
      JAX_PROCESS_ID=str(i), **env)) for i in range(count)]


def test_sigterm_to_one_of_two_processes_saves_both_at_one_step_and_one_process_resumes(
    data_dir, tmp_path):
  """Preemption across processes (JAX's sync point), then an elastic resume: the checkpoint of
  2 processes x 2 devices continues on 1 process x 4 devices, reading every global batch once,
  with the losses of an uninterrupted 1-process run."""
  stages = dict(stages=("pretrain",), **{"pretrain.steps": 24, "pretrain.checkpoint_every": 24})
  one_process = child_env("--xla_force_host_platform_device_count=4")
  reference = str(tmp_path / "reference")
  _run(_command(reference, data_dir, **stages), str(tmp_path / "reference.log"), one_process)

  workdir = str(tmp_path / "run")
  cmd = _command(workdir, data_dir, **stages)
  pair = _start_processes(cmd, 2, 2, str(tmp_path / "pair"))
  _wait_for(pair[0], _logged(workdir, "pretrain", 3), "pretrain step 3")
  pair[1].send_signal(signal.SIGTERM)  # the notice reaches one process only
  for child in pair:
    assert _finish(child) == 0, _log(child)[-4000:]
  (saved,) = _steps(workdir, "pretrain")
  assert 3 <= saved < 24
  for child in pair:
    assert f"preempted (SIGTERM) at step {saved}" in _log(child)

  log = _run(cmd, str(tmp_path / "resume.log"), one_process)
  assert f"pretrain: resumed from step {saved}" in log
  ours, theirs = _losses(workdir, "pretrain"), _losses(reference, "pretrain")
  assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, 25))
  # Other device counts sum in another order: float32 rounding apart, the same losses.
  np.testing.assert_allclose([l for _, l in ours], [l for _, l in theirs], rtol=0, atol=2e-5)


def test_a_dead_peer_stops_the_other_process_naming_it(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = _command(workdir, data_dir, stages=("pretrain",),
                 **{"pretrain.steps": 1000, "pretrain.checkpoint_every": 1000,
                    "distributed.heartbeat_timeout_s": 10})
  pair = _start_processes(cmd, 2, 1, str(tmp_path / "pair"))
  _wait_for(pair[0], _logged(workdir, "pretrain", 2), "pretrain step 2")
  _kill9(pair[1])
  start = time.monotonic()
  code = _finish(pair[0], timeout=120)
  took = time.monotonic() - start
  log = _log(pair[0])
  assert code == 3, log[-4000:]
  assert "error: lost process 1 of 2" in log, log[-4000:]
  assert took < 60, took
  print(f"process 0 exited {code} {took:.1f} s after process 1 was killed")
