"""The command line's answer to a user's mistake: one `error:` line naming the key or file,
exit status 2, no traceback, nothing written, in seconds (swinv2_jax/main.py, errors.py).

Every case runs the real `python -m swinv2_jax.main` in a subprocess (JAX on CPU), two at a
time; `pytest -s` prints how long each took to answer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from helpers import ROOT

EXIT_USER_ERROR = 2


@dataclasses.dataclass
class Case:
  args: list[str]
  expect: tuple[str, ...] = ()      # in the error message
  env: dict = dataclasses.field(default_factory=dict)
  verbose: bool = False             # a traceback is wanted
  exit_code: int = EXIT_USER_ERROR
  # The whole of stderr is the message (False where train.run logs before the error).
  quiet: bool = True


def _cases(tmp) -> dict[str, Case]:
  truncated = os.path.join(tmp, "truncated.safetensors")
  from safetensors.numpy import save_file
  save_file({"head.weight": np.zeros((64, 64), np.float32)}, truncated)
  with open(truncated, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  missing = os.path.join(tmp, "missing.safetensors")
  no_images = os.path.join(tmp, "no_images")
  digits = "--config=configs/digits.py"
  return {
      "unknown key": Case([digits, "--config.finetune.lr=1"],
                          ("config.finetune.lr: unknown key", "did you mean finetune.base_lr")),
      "unknown group": Case([digits, "--config.finetun.base_lr=1"],
                            ("config.finetun.base_lr", "did you mean finetune.base_lr?")),
      "bad value": Case([digits, "--config.model.dtype=int8"],
                        ("config.model.dtype", "'int8'", "float32")),
      "unparsable value": Case([digits, "--config.seed=abc"], ("--config.seed=abc",)),
      "num_heads length": Case([digits, "--config.model.num_heads=(5,6,12)"],
                               ("config.model.num_heads", "(5, 6, 12)", "model.depths")),
      "unknown config argument": Case(["--config=configs/digits.py:tyni"],
                                      ("config argument 'tyni' of configs/digits.py",
                                       "'' or 'tiny'")),
      "unknown recipe argument": Case(["--config=configs/swinv2_b.py:512"],
                                      ("config argument '512' of configs/swinv2_b.py",
                                       "'224', '256' or 'tiny'")),
      "misspelt flag": Case([digits, "--wrkdir=/nowhere"], ("wrkdir", "workdir")),
      "missing config file": Case(["--config=configs/digit.py"],
                                  ("configs/digit.py does not exist",
                                   "did you mean configs/digits.py")),
      "missing eval_checkpoint": Case(
          [digits, "--config.eval_only=True", f"--config.eval_checkpoint={missing}"],
          ("config.eval_checkpoint", missing, "does not exist")),
      "truncated safetensors": Case(
          [digits, "--config.stages=('finetune',)", f"--config.finetune.init={truncated}"],
          ("config.finetune.init", truncated, "truncated or corrupt", "download it again")),
      "batch over devices": Case(
          [digits, "--config.pretrain.batch_size=12"],
          ("config.pretrain.batch_size", "12", "8 devices", "multiple of 8"),
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
      "missing data set": Case(
          ["--config=configs/digits.py:tiny", "--config.data.name=folder",
           f"--config.data.folder={no_images}", "--config.stages=('finetune',)",
           "--config.finetune.init=scratch"],
          ("data.folder", no_images, "does not exist"), quiet=False),
      "verbose, flag parsing": Case([digits, "--config.finetune.lr=1", "--verbose"],
                                    ("ConfigError: config.finetune.lr: unknown key",),
                                    verbose=True, exit_code=1),
      "verbose, run": Case([digits, "--config.model.num_heads=(5,6,12)", "--verbose"],
                           ("ConfigError: config.model.num_heads",), verbose=True, exit_code=1),
  }


@dataclasses.dataclass
class Result:
  case: Case
  returncode: int
  stdout: str
  stderr: str
  seconds: float
  workdir: str


def _run(args, env_extra, workdir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
  if "XLA_FLAGS" not in env_extra:
    env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "swinv2_jax.main", *args]
  if workdir is not None:
    command.append(f"--workdir={workdir}")
  start = time.perf_counter()
  p = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return p, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("cli"))
  data_dir = os.path.join(tmp, "tfds")  # nothing outside tmp, should anything get that far
  cases = _cases(tmp)
  jobs = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for i, (name, case) in enumerate(cases.items()):
      workdir = os.path.join(tmp, f"workdir_{i}")
      args = list(case.args)
      if args[0].startswith("--config=configs/digits.py"):
        args.append(f"--config.data.data_dir={data_dir}")
      jobs[name] = (pool.submit(_run, args, case.env, workdir), case, workdir)
    for tag, (args, want) in {"--help": (["--help"], "base_lr = 0.00125"),
                              "--helpfull with --config": (
                                  ["--config=configs/digits.py:tiny", "--helpfull"],
                                  "base_lr = 0.004")}.items():
      jobs[tag] = (pool.submit(_run, args, {}), Case(args, (want,), exit_code=1), None)
    out = {}
    for name, (future, case, workdir) in jobs.items():
      p, seconds = future.result()
      out[name] = Result(case, p.returncode, p.stdout, p.stderr, seconds, workdir)
  yield out
  print("\ncase | seconds to answer | message")
  for name, r in out.items():
    first = next((line for line in r.stderr.splitlines() if line.startswith("error:")),
                 r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "(help on stdout)")
    print(f"{name} | {r.seconds:.1f} | {first}")


USER_ERRORS = [
    "unknown key", "unknown group", "bad value", "unparsable value", "num_heads length",
    "unknown config argument", "unknown recipe argument", "misspelt flag", "missing config file",
    "missing eval_checkpoint", "truncated safetensors", "batch over devices",
    "missing data set"]


@pytest.mark.parametrize("name", USER_ERRORS)
def test_user_error_is_one_line(results, name):
  r = results[name]
  assert r.returncode == EXIT_USER_ERROR, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  assert "error: " in r.stderr, r.stderr
  message = r.stderr[r.stderr.index("error: "):].strip().splitlines()
  assert message[0].startswith("error: ") and len(message) <= 4, r.stderr
  if r.case.quiet:  # absl adds nothing: the message is all of stderr
    assert r.stderr.strip().splitlines() == message, r.stderr
  for text in r.case.expect:
    assert text in "\n".join(message), (text, r.stderr)
  assert not os.path.exists(r.workdir), os.listdir(r.workdir)


@pytest.mark.parametrize("name", ["verbose, flag parsing", "verbose, run"])
def test_verbose_shows_the_traceback(results, name):
  r = results[name]
  assert r.returncode == r.case.exit_code, r.stderr
  assert "Traceback (most recent call last)" in r.stderr
  for text in r.case.expect:
    assert text in r.stderr, (text, r.stderr)
  assert not os.path.exists(r.workdir)


@pytest.mark.parametrize("name", ["--help", "--helpfull with --config"])
def test_help_lists_config_keys_with_defaults(results, name):
  r = results[name]
  assert "Traceback" not in r.stderr, r.stderr
  for text in r.case.expect:
    assert f"config.finetune.{text}" in r.stdout, r.stdout
  assert "config.model.num_heads = " in r.stdout and "--verbose" in r.stdout


def test_answers_in_seconds(results):
  """Each answer is the interpreter, the imports (jax, flax) and milliseconds of checks."""
  slow = {name: round(r.seconds, 1) for name, r in results.items() if r.seconds > 60}
  assert not slow, slow


# ---------------------------------------------------------------------------------------------
# In-process checks of the pieces (no subprocess).
# ---------------------------------------------------------------------------------------------
def test_only_our_own_value_errors_are_user_errors():
  from swinv2_jax import errors
  from swinv2_jax.weights import readers

  def caught(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError("no exception")

  ours = caught(lambda: readers.read_state_dict(os.path.join(ROOT, "README.md")))
  assert isinstance(ours, ValueError) and errors.is_user_error(ours)
  numpy_bug = caught(lambda: np.zeros(3).reshape(2, 2))
  assert isinstance(numpy_bug, ValueError) and not errors.is_user_error(numpy_bug)
  assert not errors.is_user_error(caught(lambda: {}["x"]))
  assert errors.is_user_error(caught(lambda: open(os.path.join(ROOT, "no such file"))))
  assert "no such file" in errors.message(caught(lambda: open(os.path.join(ROOT, "no such file"))))


def test_long_messages_are_cut_to_a_few_lines():
  from swinv2_jax import errors
  text = errors.message(ValueError("\n".join(f"line {i}" for i in range(20))))
  assert len(text.splitlines()) == errors.MAX_LINES and "--verbose" in text


def test_unknown_key_suggests_the_nearest():
  from swinv2_jax import config as config_lib
  base = config_lib.base_config()
  assert config_lib.unknown_key_message("finetune.lr", base).startswith(
      "unknown key; did you mean finetune.base_lr")
  assert config_lib.unknown_key_message("model.num_head", base) == (
      "unknown key; did you mean model.num_heads?")
  assert "pretrain.batch_size" in config_lib.unknown_key_message("batch_size", base)
  assert config_lib.unknown_key_message("model.zzz", base).startswith(
      "unknown key (known here: attention_chunks, attention_impl, depths")
  with base.unlocked():
    base.finetune.lr = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"config\.finetune\.lr: unknown key; "
                     r"did you mean finetune\.base_lr"):
    config_lib.validate(base)


def test_every_config_file_rejects_an_unknown_argument():
  from helpers import load_config
  from swinv2_jax import config as config_lib
  from swinv2_jax import errors
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py"):
      with pytest.raises(config_lib.ConfigError, match=rf"config argument 'tyni' of "
                         rf"\S*configs/{re.escape(name)}: use ''") as info:
        load_config(name, "tyni")
      assert isinstance(info.value, errors.UserError)


def test_truncated_pth_names_the_file(tmp_path):
  from swinv2_jax.weights import readers
  path = str(tmp_path / "model.pth")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", b"x" * 4096)
  readers.check_checkpoint_file(path)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(readers.CorruptCheckpointError, match=f"{path} is truncated or corrupt"):
    readers.read_state_dict(path)
