"""A run whose workdir and tfds data_dir are gs:// URLs, against a real storage server on
127.0.0.1 (tests/storage_server.py): it runs end to end, is SIGKILLed once its first
checkpoint object appears, and the same command resumes it to the uninterrupted run's result.

Every run is a real `python -m swinv2_jax.main` child whose environment points gcsfs,
TensorStore and array_record at the server; what it wrote is listed and read through the
server's JSON API, never the local disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import CONFIGS, child_env, config_args
from storage_server import GcsServer

BUCKET = "bucket"
DATA_DIR = f"gs://{BUCKET}/tfds"
# configs/digits.py:tiny on a one-level model: 4 steps per training stage, a checkpoint every
# 2, an evaluation at fine-tune step 3 (digits:tiny's eval_every) and the eval stage.
OVERRIDES = {
    "model.embed_dim": 16, "model.depths": (2,), "model.num_heads": (1,),
    "pretrain.steps": 4, "pretrain.checkpoint_every": 2, "pretrain.log_every": 1,
    "finetune.steps": 4, "finetune.checkpoint_every": 2, "finetune.log_every": 1,
    "finetune.pretrained_window_sizes": 4, "data.data_dir": DATA_DIR,
}
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server():
  with GcsServer(buckets=(BUCKET,)) as s:
    yield s


def _command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "swinv2_jax.main",
          f"--config={os.path.join(CONFIGS, 'digits.py')}:tiny", f"--workdir={workdir}"
          ] + config_args(OVERRIDES)


def _start(server, workdir: str, cwd, log) -> subprocess.Popen:
  """The main job on `workdir`, run from `cwd` (where a path mistaken for a local one would
  land), its output in the file `log`."""
  with open(log, "w") as out:
    return subprocess.Popen(_command(workdir), env=child_env(**server.env), cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(child: subprocess.Popen, log, what: str) -> str:
  try:
    child.wait(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
  text = log.read_text()
  assert child.returncode == 0, f"{what} failed (exit {child.returncode}):\n{text[-6000:]}"
  return text


def _kill_when(server, child: subprocess.Popen, log, prefix: str) -> None:
  """SIGKILLs the child (and all it started) once an object whose name starts with `prefix`
  exists."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not server.objects(BUCKET, prefix):
    assert child.poll() is None, f"the run ended before {prefix}:\n{log.read_text()[-4000:]}"
    assert time.monotonic() < deadline, f"no {prefix} in {RUN_TIMEOUT_S} s"
    time.sleep(0.05)
  os.killpg(child.pid, signal.SIGKILL)
  child.wait()
  assert child.returncode == -signal.SIGKILL


def _eval_json(server, run: str) -> dict:
  return json.loads(server.read(BUCKET, f"{run}/eval.json"))


def _metrics(server, run: str) -> list[dict]:
  return [json.loads(line) for line in
          server.read(BUCKET, f"{run}/metrics.jsonl").decode().splitlines()]


def test_run_in_a_bucket_is_killed_and_resumes_to_the_same_result(server, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  start = time.perf_counter()

  # Uninterrupted: every output is an object in the bucket, nothing is on the local disk.
  log = tmp_path / "full.log"
  text = _finish(_start(server, f"gs://{BUCKET}/full", cwd, log), log, "the uninterrupted run")
  full_s = time.perf_counter() - start
  names = server.objects(BUCKET, "full/")
  for expected in ("full/config.json", "full/metrics.jsonl", "full/eval.json",
                   "full/pretrain/checkpoints/4/commit_success.txt",
                   "full/finetune/checkpoints/4/commit_success.txt",
                   "full/pretrain/encoder/commit_success.txt"):
    assert expected in names, f"{expected} not in the bucket: {names}\n{text[-3000:]}"
  for prefix in ("full/tensorboard/events.out.tfevents.", "full/pretrain/checkpoints/2/state/",
                 "full/finetune/checkpoints/4/state/ocdbt.process_0/d/"):
    assert any(n.startswith(prefix) for n in names), f"no {prefix}* in the bucket: {names}"
  data = server.objects(BUCKET, "tfds/digits/")
  assert any(n.endswith("digits-train.array_record-00000-of-00001") for n in data), data
  assert os.listdir(cwd) == [], f"written to the local disk: {os.listdir(cwd)}"
  full = _eval_json(server, "full")
  assert full["num_examples"] == 360
  assert full["checkpoint"] == f"gs://{BUCKET}/full/finetune/checkpoints/4"
  assert [(r["stage"], r["step"]) for r in _metrics(server, "full")
          if r["stage"] == "pretrain"] == [("pretrain", s) for s in (1, 2, 3, 4)]

  # The same command, SIGKILLed once its first checkpoint object exists (a save under way),
  # again once fine-tuning has committed a checkpoint, then run to the end: it resumes from
  # what the bucket holds.
  workdir = f"gs://{BUCKET}/killed"
  for i, prefix in enumerate(("killed/pretrain/checkpoints/",
                              "killed/finetune/checkpoints/2/commit_success.txt")):
    log = tmp_path / f"killed_{i}.log"
    _kill_when(server, _start(server, workdir, cwd, log), log, prefix)
    assert "killed/eval.json" not in server.objects(BUCKET, "killed/")
  log = tmp_path / "resumed.log"
  text = _finish(_start(server, workdir, cwd, log), log, "the resumed run")

  resumed = _eval_json(server, "killed")
  assert resumed.pop("checkpoint") == f"gs://{BUCKET}/killed/finetune/checkpoints/4"
  full.pop("checkpoint")
  assert resumed == full, text[-3000:]
  records = [(r["stage"], r["step"]) for r in _metrics(server, "killed")]
  assert len(records) == len(set(records)), f"a (stage, step) logged twice: {records}"
  assert os.listdir(cwd) == [], f"written to the local disk: {os.listdir(cwd)}"
  print(f"uninterrupted run {full_s:.1f} s; whole test {time.perf_counter() - start:.1f} s")


def test_a_workdir_that_cannot_hold_a_run_is_one_line(server, tmp_path):
  """s3:// (orbax writes no checkpoint there) and a missing bucket are refused before anything
  compiles, and the missing bucket is not created."""
  cases = {f"s3://{BUCKET}/run": "--workdir: s3:// is not supported",
           "gs://no-such-bucket/run": "--workdir: the bucket gs://no-such-bucket does not exist"}
  children = {workdir: (_start(server, workdir, tmp_path, tmp_path / f"{i}.log"),
                        tmp_path / f"{i}.log") for i, workdir in enumerate(cases)}
  for workdir, (child, log) in children.items():
    child.wait(timeout=120)
    out = log.read_text()
    assert child.returncode == 2, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"error: {cases[workdir]}"), out[-3000:]
  assert server.list_buckets() == [BUCKET]
