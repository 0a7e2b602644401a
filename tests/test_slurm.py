"""The SLURM launch path run for real: launch/slurm_cpu.sbatch, the CPU twin of
launch/slurm_gpu.sbatch, submitted to a one-node SLURM on this machine (.ci/slurm_setup.sh
brings one up in CI; without `sbatch` on PATH the test is skipped).

Its two tasks form one jax.distributed run from SLURM's variables alone
(swinv2_jax/distributed.py) and run every stage of the tiny digits job. A second job, cancelled
with scancel once it has written a checkpoint (SLURM sends SIGTERM, then SIGKILL KillWait
seconds later), submitted again with the same workdir ends where the uninterrupted job ended.
"""

import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from helpers import ROOT, child_env, config_args
# The 2-process overrides, and the digits set prepared once (a fixture).
from test_multiprocess import OVERRIDES, data_dir  # noqa: F401

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="no SLURM here: sbatch is not on PATH (.ci/slurm_setup.sh installs and starts one)")

SCRIPT = os.path.join(ROOT, "launch", "slurm_cpu.sbatch")
# A checkpoint after 2 pretraining steps: the job is cancelled once it exists.
SLURM_OVERRIDES = dict(OVERRIDES, **{
    "pretrain.checkpoint_every": 2, "finetune.steps": 12, "finetune.checkpoint_every": 6,
    "finetune.eval_every": 6})
NUM_TASKS = 2  # the twin's --ntasks-per-node
JOB_TIMEOUT_S = 300
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _sbatch(workdir: str, data_dir: str, log: str) -> str:
  """Submits the twin on the tiny digits job; returns the job id."""
  args = config_args(dict(SLURM_OVERRIDES, **{"data.data_dir": data_dir}))
  # sbatch hands its environment to the job (--export=ALL): the compilation cache among it.
  env = child_env(CONFIG="configs/digits.py:tiny", WORKDIR=workdir)
  out = subprocess.run(["sbatch", "--parsable", f"--output={log}", SCRIPT, *args], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, (
      f"sbatch failed (is SLURM running? .ci/slurm_setup.sh starts it):\n{out.stderr}")
  return out.stdout.strip().split(";")[0]


def _state(job: str) -> str:
  out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                       check=True)
  return re.search(r"\bJobState=(\S+)", out.stdout).group(1)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _end(job: str, log: str) -> str:
  """Waits until the job has ended (its processes too: not COMPLETING); its final state."""
  deadline = time.monotonic() + JOB_TIMEOUT_S
  while (state := _state(job)) not in ENDED:
    if time.monotonic() > deadline:
      subprocess.run(["scancel", "--signal=KILL", job], check=False)
      pytest.fail(f"job {job} still {state} after {JOB_TIMEOUT_S} s:\n{_read(log)[-4000:]}")
    time.sleep(0.5)
  return state


def _curve(workdir: str) -> list[tuple]:
  """(stage, step, loss or top-1) of each metrics.jsonl record."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [(r["stage"], r["step"], r.get("loss", r.get("top1"))) for r in records]


def _eval(workdir: str) -> dict:
  result = json.loads(_read(os.path.join(workdir, "eval.json")))
  return dict(result, checkpoint=os.path.basename(result["checkpoint"]))  # its step


def test_slurm_job_is_one_distributed_run_and_resumes_after_scancel(data_dir, tmp_path):
  # The uninterrupted job: both tasks join one jax.distributed run and run every stage.
  workdir, log = str(tmp_path / "run"), str(tmp_path / "run.out")
  job = _sbatch(workdir, data_dir, log)
  state, out = _end(job, log), _read(log)
  assert state == "COMPLETED", f"job {job} {state}:\n{out[-6000:]}"
  for p in range(NUM_TASKS):
    assert f"process {p} of {NUM_TASKS}, 1 local / {NUM_TASKS} global devices" in out
  expected = _eval(workdir)
  assert expected["num_examples"] == 360

  # The same job cancelled once its first checkpoint is written...
  resumed, log = str(tmp_path / "resumed"), str(tmp_path / "cancelled.out")
  job = _sbatch(resumed, data_dir, log)
  first = os.path.join(resumed, "pretrain", "checkpoints", "2")
  deadline = time.monotonic() + JOB_TIMEOUT_S
  while not os.path.isdir(first):
    assert time.monotonic() < deadline and _state(job) not in ENDED, (
        f"job {job} wrote no checkpoint {first}:\n{_read(log)[-4000:]}")
    time.sleep(0.1)
  subprocess.run(["scancel", job], check=True)
  state, out = _end(job, log), _read(log)
  assert state == "CANCELLED", f"job {job} {state}:\n{out[-4000:]}"
  assert not os.path.exists(os.path.join(resumed, "eval.json")), "the cancelled job finished"
  # scancel sends SIGTERM first: both tasks save at one step (swinv2_jax/preemption.py), say
  # so and exit 0 before KillWait, where srun would report "task N: Exited with exit code" or
  # "Killed".
  assert out.count("preempted (SIGTERM)") == NUM_TASKS, out[-4000:]
  assert not re.search(r"srun: error: .*: tasks? [\d,-]+: ", out), out[-4000:]

  # ...and submitted again with the same workdir ends as the uninterrupted job did: the same
  # losses at the same steps (none twice) and the same evaluation.
  log = str(tmp_path / "resumed.out")
  job = _sbatch(resumed, data_dir, log)
  state = _end(job, log)
  assert state == "COMPLETED", f"job {job} {state}:\n{_read(log)[-6000:]}"
  got, want = _curve(resumed), _curve(workdir)
  assert [r[:2] for r in got] == [r[:2] for r in want]
  np.testing.assert_allclose([r[2] for r in got], [r[2] for r in want], rtol=0, atol=1e-6)
  assert _eval(resumed) == expected
