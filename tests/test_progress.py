"""What a run shows: the real `python -m swinv2_jax.main` on the tiny model of test_train.py,
its output piped (not a terminal): compile messages and summary tables, a progress line per log
period, evaluation lines, the end-of-job summary, and nothing from other libraries unless
--verbosity is given; what it leaves for TensorBoard; and, on a terminal (a real pty), the live
bar.
"""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap

import pytest
from tensorboardX.proto import event_pb2

from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import progress

from helpers import ROOT, load_config
from test_train import tiny_config

PACKAGE = os.path.join(ROOT, "swinv2_jax")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STEPS, LOG_EVERY, IMAGE_EVERY, EVAL_EVERY = 8, 2, 4, 3
# absl's prefix: 'I1130 05:18:47.818650 140484536068992 progress.py:308] '
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)$")
PROGRESS_LINE = re.compile(
    r"^(pretrain|finetune) step (\d+)/(\d+) \((\d+)%\), epoch ([\d.e+-]+): loss ([\d.]+), lr "
    r"\S+, grad norm \S+ \| ([\d.]+) images/s, \S+ TFLOP/s per device, MFU (n/a|[\d.]+%), "
    r"input wait (\d+)% \| ETA (\S+), job (\S+)$")
DURATION = re.compile(r"^(\d+s|\d+m\d\ds|\d+h\d\dm|\d+d\d\dh)$")


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), FAST_COMPILE]).strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  import jax  # the suite's compilation cache (tests/conftest.py), for the children too
  if jax.config.jax_compilation_cache_dir:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _flag_value(value) -> str:
  return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def tiny_flags(data_dir: str, **overrides) -> list[str]:
  """test_train.tiny_config (with `overrides`, dotted keys) as --config.<key> flags over
  configs/digits.py:tiny."""
  base = config_lib.flatten(load_config("digits.py", "tiny"))
  config = tiny_config(data_dir, steps=STEPS)
  config.update_from_flattened_dict(overrides)
  return [f"--config.{k}={_flag_value(v)}" for k, v in config_lib.flatten(config).items()
          if base.get(k) != v]


# The progress test's run: a line every 2 steps, TensorBoard images every 4, evaluations every 3.
OVERRIDES = {"pretrain.log_every": LOG_EVERY, "finetune.log_every": LOG_EVERY,
             "pretrain.image_every": IMAGE_EVERY, "finetune.eval_every": EVAL_EVERY}


def tiny_job(workdir: str, data_dir: str, *extra: str) -> subprocess.CompletedProcess:
  """`python -m swinv2_jax.main` on the tiny model (every stage), output piped; also the
  run test_report.py draws (the same programs: the second finds them compiled)."""
  command = [sys.executable, "-m", "swinv2_jax.main", "--config=configs/digits.py:tiny",
             f"--workdir={workdir}", *tiny_flags(data_dir, **OVERRIDES), *extra]
  return subprocess.run(command, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny job (every stage), its stdout and stderr piped. The digits set is built here
  first: a run that builds it also shows tfds's own first-build output."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data_lib.dataset_info(tiny_config(data_dir).data)
  result = tiny_job(workdir, data_dir)
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(workdir=workdir, data_dir=data_dir, stdout=result.stdout,
              lines=result.stderr.splitlines())


def _messages(lines):
  """(level, file, message) of each absl line."""
  return [m.groups() for m in map(ABSL_LINE.match, lines) if m]


def test_every_log_period_prints_a_progress_line(run):
  found = {"pretrain": [], "finetune": []}
  for _, _, message in _messages(run["lines"]):
    m = PROGRESS_LINE.match(message)
    if m:
      found[m.group(1)].append(m)
  for stage, lines in found.items():
    # log_every=2; checkpoints every 4 steps log too.
    assert [int(m.group(2)) for m in lines] == [2, 4, 6, 8], (stage, run["lines"])
    for m in lines:
      step, total, percent = int(m.group(2)), int(m.group(3)), int(m.group(4))
      assert total == STEPS and percent == round(100 * step / STEPS)
      # 32 images a step over the 1,437 train images of digits.
      assert float(m.group(5)) == pytest.approx(step * 32 / 1437, rel=0.01)
      assert float(m.group(7)) > 0 and m.group(8) == "n/a"  # no known peak for a CPU
      assert 0 <= int(m.group(9)) <= 100
      assert DURATION.match(m.group(10)) and DURATION.match(m.group(11)), m.group(0)
    assert lines[-1].group(10) == "0s"  # the stage is done
  # The job's ETA during pretraining counts fine-tuning still to come.
  assert found["pretrain"][-1].group(11) != "0s"


def test_each_stage_says_it_compiles_then_shows_its_summary_table(run):
  text = "\n".join(run["lines"])
  for stage in ("pretrain", "finetune"):
    assert f"{stage}: compiling the train step (32 px, global batch 32)..." in text
    table = re.search(rf"{stage}: compiled in [\d.]+ s\n((?:[^IWEF].*\n)+)", text)
    assert table, text
    rows = table.group(1)
    assert "model: SwinV2 C=16, depths (2, 2), heads (1, 2), patch 4 (custom:" in rows
    assert "mesh: data=1 (1 x cpu), ZeRO 1" in rows
    assert "data: 1,437 train / 360 eval examples, 10 classes" in rows
    assert re.search(r"steps +8 \(0\.2 epochs\)", rows), rows
    for label in ("parameters", "model FLOPs / image", "global batch", "accumulation x micro",
                  "params / device", "optimizer state / device", "total / device"):
      row = re.search(rf"^{re.escape(label)} +(\S.*)$", rows, re.M)
      assert row and row.group(1).strip(), (label, rows)  # no empty row


def test_evaluations_show_their_progress(run):
  evals = [msg for _, _, msg in _messages(run["lines"])
           if re.match(r"eval: 360 images in [\d.]+ s \([\d.]+ images/s\)$", msg)]
  assert len(evals) == 3  # at fine-tune steps 3 and 6, then the eval stage


def test_the_job_ends_with_a_summary(run):
  text = "\n".join(run["lines"])
  summary = text[text.index("job done in"):]
  workdir = run["workdir"]
  assert re.search(r"^  pretrain +\S+  compile \d+s, to step 8, last loss [\d.]+$", summary,
                   re.M), summary
  assert re.search(r"^  finetune +\S+  compile \d+s, to step 8, last loss [\d.]+$", summary,
                   re.M), summary
  assert re.search(r"^  final: top-1 [\d.]+, top-5 [\d.]+ on 360 images \(best top-1 [\d.]+ "
                   r"at step \d\)$", summary, re.M), summary
  for path in ("metrics.jsonl", "tensorboard", "eval.json",
               os.path.join("pretrain", "encoder")):
    assert os.path.join(workdir, path) in summary
  assert f"python -m swinv2_jax.report --workdir={workdir}" in summary


def test_other_libraries_stay_quiet_and_nothing_draws_a_bar(run):
  messages = _messages(run["lines"])
  own = {name for name in os.listdir(PACKAGE) if name.endswith(".py")}
  assert {file for _, file, _ in messages} <= own, sorted({file for _, file, _ in messages})
  text = "\n".join(run["lines"])
  for noise in ("libtpu", "OpenCV", "orbax", "Load dataset info"):
    assert noise not in text
  assert "\r" not in text and "%|" not in text  # piped: plain lines, no live bar
  assert run["stdout"] == ""


def test_verbosity_on_the_command_line_brings_other_libraries_back(run):
  result = tiny_job(run["workdir"], run["data_dir"], "--config.eval_only=True",
                    "--verbosity=0")
  assert result.returncode == 0, result.stderr[-4000:]
  files = {file for _, file, _ in _messages(result.stderr.splitlines())}
  own = {name for name in os.listdir(PACKAGE) if name.endswith(".py")}
  assert files - own, files  # orbax's and JAX's lines are back


def _events(workdir: str) -> dict[str, list]:
  """TensorBoard's event files: tag -> [(step, value or (width, height) of an image)]."""
  out = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in os.listdir(folder):
    data = open(os.path.join(folder, name), "rb").read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        value = (v.image.width, v.image.height) if v.HasField("image") else v.simple_value
        out.setdefault(v.tag, []).append((event.step, value))
  return out


def test_metrics_and_tensorboard_hold_every_scalar_and_the_reconstructions(run):
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  first = records[0]
  for key in ("loss", "lr", "grad_norm", "images_per_s", "epoch", "tflops_per_device",
              "input_wait", "eta_s"):
    assert key in first, first
  events = _events(run["workdir"])
  for key in ("loss", "images_per_s", "epoch", "tflops_per_device", "input_wait", "eta_s"):
    assert [s for s, _ in events[f"pretrain/{key}"]] == [2, 4, 6, 8], key
  assert [s for s, _ in events["eval/top1"]] == [3, 6]
  # Masked input, reconstruction, original side by side; a row for each of 4 images, each
  # 32 px image enlarged 4x, 2 px between tiles.
  images = events["pretrain/reconstruction"]
  assert [s for s, _ in images] == [4, 8]
  assert images[0][1] == (3 * 128 + 2 * 2, 4 * 128 + 3 * 2)


_BAR_SCRIPT = textwrap.dedent("""
    import itertools, sys, time
    sys.path.insert(0, "tests")
    from absl import app, logging
    from helpers import load_config
    from swinv2_jax import logs, progress

    def main(argv):
      logs.quiet_other_libraries()
      p = progress.Progress(load_config("digits.py", "tiny"))
      p.begin("pretrain")
      p.start("pretrain", 0)
      batches = itertools.count()
      for step in range(1, 7):
        p.next_batch(batches)
        time.sleep(0.05)
        if step % 3 == 0:
          p.log_step(step, dict(loss=1.0, lr=1e-3, grad_norm=0.5))
      p.finish("/tmp/w")

    logging.set_verbosity(logging.INFO)
    app.run(main)
""")


def test_a_terminal_gets_a_live_bar_cleared_before_each_line():
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
  child = subprocess.Popen([sys.executable, "-c", _BAR_SCRIPT], cwd=ROOT, env=_env(),
                           stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
  os.close(follower)
  chunks = []
  while True:
    try:
      chunk = os.read(leader, 65536)
    except OSError:  # the child closed the terminal
      break
    if not chunk:
      break
    chunks.append(chunk)
  assert child.wait(timeout=120) == 0
  os.close(leader)
  out = b"".join(chunks).decode("utf-8", "replace")
  assert re.search(r"pretrain +\d+%\|.*\| [1-6]/6, loss 1\.0000 \| \d+ images/s \| ETA", out)
  # Each progress line starts on a cleared line: the bar is wiped, then absl writes.
  for line in re.findall(r"[^\n]*pretrain step [36]/6[^\n]*", out):
    assert re.search(r"\r +\rI\d{4} ", line), repr(line)


def test_durations_read_as_a_person_writes_them():
  assert [progress.duration(s) for s in (0.4, 45, 185, 7620, 273600)] == [
      "0s", "45s", "3m05s", "2h07m", "3d04h"]
