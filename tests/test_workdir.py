"""The workdir contract (swinv2_jax/workdir.py): a refused run writes nothing, a rerun with
another config is refused by name, metrics.jsonl holds each step once after a resume, and a
skipped stage rewrites nothing."""

import json
import logging
import os
import shutil

import pytest
import safetensors.numpy

from swinv2_jax import config as config_lib
from swinv2_jax import data
from swinv2_jax import train
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights
from swinv2_jax import workdir as workdir_lib

from helpers import load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir):
  """tests/test_train.py's tiny config (the same programs, so the compilation cache serves
  both): 8 steps per stage, a log line every step, checkpoints at 4 and 8, evaluations at
  fine-tune steps 3 and 6."""
  c = load_config("digits.py", "tiny")
  c.data.data_dir = data_dir
  c.model.embed_dim, c.model.depths, c.model.num_heads = 16, (2, 2), (1, 2)
  for stage in (c.pretrain, c.finetune):
    stage.steps, stage.warmup_steps, stage.log_every, stage.checkpoint_every = 8, 1, 1, 4
    stage.batch_size, stage.base_lr, stage.min_lr = 32, 8e-2, 1e-3
  c.pretrain.pretrained_window_sizes, c.finetune.pretrained_window_sizes = 0, 4
  c.eval.batch_size = 64
  return c


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A workdir after a whole run of the tiny config; tests work on copies (`copy_of`)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train.run(tiny_config(data_dir), workdir)
  return workdir


def copy_of(workdir, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(workdir, target)  # copy2: sizes and mtimes as they were
  return target


def listing(workdir):
  """Every path under the workdir with its size and mtime (directories: mtime only)."""
  if not os.path.exists(workdir):
    return None
  out = {".": os.stat(workdir).st_mtime_ns}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.lstat(path)
      out[os.path.relpath(path, workdir)] = (None if name in dirs else st.st_size,
                                             st.st_mtime_ns)
  return out


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def refused(config, workdir, match, error=config_lib.ConfigError):
  """Runs `config` on `workdir`, expects a refusal and that the workdir is as it was."""
  before = listing(workdir)
  with pytest.raises(error, match=match) as info:
    train.run(config, workdir)
  assert "\n" not in str(info.value)
  assert listing(workdir) == before
  return str(info.value)


# ---------------------------------------------------------------------------------------------
# 1. A refused run writes nothing.
# ---------------------------------------------------------------------------------------------
def test_refused_runs_write_nothing(data_dir, tmp_path):
  fresh = str(tmp_path / "fresh")
  config = tiny_config(data_dir)
  config.data = data.default_data_config("folder")
  config.data.folder = str(tmp_path / "no_images")
  refused(config, fresh, r"^data.folder: .* does not exist", error=data.DatasetNotFoundError)

  config = tiny_config(data_dir)
  config.stages = ("finetune", "eval")
  refused(config, fresh, r"^config.finetune.init: 'pretrain', but .*pretrain/encoder does not "
          r"exist and config.stages has no 'pretrain'")
  config.finetune.init = str(tmp_path / "missing.safetensors")
  refused(config, fresh, r"^config.finetune.init: .*missing.safetensors does not exist; give a")
  os.makedirs(tmp_path / "not_a_checkpoint")
  config.finetune.init = str(tmp_path / "not_a_checkpoint")
  refused(config, fresh, r"^config.finetune.init: .*not_a_checkpoint is a directory but no "
          r"parameter checkpoint")
  if os.geteuid() != 0:  # root reads every file
    unreadable = tmp_path / "unreadable.safetensors"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    config.finetune.init = str(unreadable)
    refused(config, fresh, r"is not readable$")

  config = tiny_config(data_dir)
  config.eval_only = True
  refused(config, fresh, r"^config.eval_checkpoint: empty, and no fine-tuning checkpoint in "
          r".*finetune/checkpoints to evaluate")
  config.eval_checkpoint = str(tmp_path / "missing.pth")
  refused(config, fresh, r"^config.eval_checkpoint: .*missing.pth does not exist; give a")

  # Weights of another size, or with a head for 1000 classes and drop_head off: refused with
  # the key that fixes it, before anything is written.
  for change, fix in ((dict(embed_dim=32, num_heads=(2, 4)), "config.model"),
                      (dict(num_classes=1000), "config.finetune.drop_head=True")):
    wrong = tiny_config(data_dir)
    wrong.stages, wrong.finetune.drop_head = ("finetune",), False
    other = wrong.copy_and_resolve_references()
    num_classes = change.pop("num_classes", 10)
    other.model.update(change)
    path = str(tmp_path / f"other_{num_classes}.safetensors")
    safetensors.numpy.save_file(weights.to_pytorch_state_dict(
        trainer_lib.build_classifier(other, "finetune", num_classes)), path)
    wrong.finetune.init = path
    message = refused(wrong, fresh, r"^config.finetune.init: .* does not fit the model \(")
    assert fix in message, message

  # The same refusals leave an existing workdir byte for byte (and mtime for mtime) as it was.
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  config.eval_checkpoint = ""
  refused(config, str(existing), r"^config.eval_checkpoint: empty")
  config = tiny_config(data_dir)
  config.finetune.batch_size, config.finetune.accum_steps = 3, 2  # batch arithmetic
  refused(config, str(existing), r"^config.finetune.batch_size")


# ---------------------------------------------------------------------------------------------
# 2. A rerun with another config is refused, naming the keys; resumable keys may change.
# ---------------------------------------------------------------------------------------------
def test_a_changed_config_is_refused_naming_the_keys(data_dir, trained, tmp_path, caplog):
  workdir = copy_of(trained, tmp_path)
  config = tiny_config(data_dir)
  config.finetune.base_lr, config.model.embed_dim = 1e-2, 32
  message = refused(config, workdir, r"^config differs from")
  assert message == (f"config differs from {workdir}/config.json in: finetune.base_lr (0.08 -> "
                     f"0.01), model.embed_dim (16 -> 32); use a new --workdir, or set them back")
  config = tiny_config(data_dir)
  config.finetune.steps = 6  # its last checkpoint is step 8
  refused(config, workdir, r"^config differs from .* in: finetune.steps \(8 -> 6: below its "
          r"checkpoint at step 8\); use a new --workdir")

  # `stages` may change; then tuples given as lists are the same config: nothing is rewritten
  # (both stages are complete, no eval).
  config = tiny_config(data_dir)
  config.stages = ("pretrain", "finetune")
  train.run(config, workdir)
  config.stages = ["pretrain", "finetune"]
  config.model.depths, config.model.num_heads = [2, 2], [1, 2]
  before = listing(workdir)
  train.run(config, workdir)
  assert listing(workdir) == before

  # Resumable keys: accepted, logged, and config.json follows.
  config.finetune.log_every, config.checkpoint.keep, config.eval.batch_size = 2, 3, 32
  with caplog.at_level(logging.INFO):
    train.run(config, workdir)
  assert any("config.json updated: checkpoint.keep (2 -> 3); eval.batch_size (64 -> 32); "
             "finetune.log_every (1 -> 2)" in r.getMessage() for r in caplog.records)
  saved = workdir_lib.flatten(workdir_lib.read_config(workdir))
  assert saved["finetune.log_every"] == 2 and saved["checkpoint.keep"] == 3
  after = listing(workdir)
  assert {k for k in after if after[k] != before.get(k)} == {".", "config.json"}


def write_config(workdir, config):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(workdir_lib.config_json(config), f)


def test_which_differences_a_workdir_allows(data_dir, tmp_path):
  """check_config on its own: what binds depends on which stages have checkpoints."""
  workdir = str(tmp_path / "run")
  old = tiny_config(data_dir)
  write_config(workdir, old)
  new = tiny_config(data_dir)
  new.finetune.base_lr, new.model.embed_dim, new.finetune.steps = 1e-2, 32, 12
  new.pretrain.steps, new.finetune.log_every = 4, 5
  check = lambda latest: workdir_lib.check_config(workdir_lib.config_json(new), workdir,
                                                  dict(dict(pretrain=None, finetune=None),
                                                       **latest))
  # No checkpoint yet (a run that stopped before its first one): every key is free.
  lines = check({})
  assert any("model.embed_dim (16 -> 32)" in line and "no checkpoint of any stage yet" in line
             for line in lines)
  # Pretraining has one, fine-tuning none: fine-tune keys are free, shared keys bound.
  with pytest.raises(config_lib.ConfigError) as error:
    check(dict(pretrain=4))
  assert "in: model.embed_dim (16 -> 32); use" in str(error.value)
  new.model.embed_dim = 16
  lines = check(dict(pretrain=4))
  assert "pretrain: steps 8 -> 4: the stage ends at its step-4 checkpoint" in lines
  assert any(line.startswith("config.json updated: finetune.base_lr (0.08 -> 0.01), "
                             "finetune.steps (8 -> 12) (no checkpoint of finetune yet)")
             for line in lines)
  # Both have one: finetune.base_lr binds, steps may grow past the checkpoint, not shrink.
  with pytest.raises(config_lib.ConfigError, match=r"in: finetune.base_lr \(0.08 -> 0.01\); "):
    check(dict(pretrain=4, finetune=8))
  new.finetune.base_lr = old.finetune.base_lr
  lines = check(dict(pretrain=4, finetune=8))
  assert lines[:2] == ["finetune: steps 8 -> 12: the lr schedule is re-laid over 12 steps "
                       "from step 8", "pretrain: steps 8 -> 4: the stage ends at its step-4 "
                       "checkpoint"]
  assert lines[2] == "config.json updated: finetune.log_every (1 -> 5)"
  with pytest.raises(config_lib.ConfigError, match=r"pretrain.steps \(8 -> 4: below its "
                     r"checkpoint at step 6\)"):
    check(dict(pretrain=6, finetune=8))


def test_every_resumable_key_exists():
  keys = workdir_lib.flatten(workdir_lib.config_json(config_lib.base_config()))
  for r in workdir_lib.RESUMABLE:
    assert any(k == r or (r.endswith(".") and k.startswith(r)) for k in keys), r


# ---------------------------------------------------------------------------------------------
# 3. metrics.jsonl: each (stage, step) once after a resume.
# ---------------------------------------------------------------------------------------------
def test_metrics_hold_each_step_once_after_a_resume(data_dir, trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  records = read_metrics(workdir)
  # A kill after logging steps 5..8 (and the evaluation at 6) but before the step-8
  # checkpoints, halfway through writing a line.
  for stage in ("pretrain", "finetune"):
    shutil.rmtree(os.path.join(workdir, stage, "checkpoints", "8"))
  shutil.rmtree(os.path.join(workdir, "pretrain", "encoder"))
  os.remove(os.path.join(workdir, "eval.json"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"stage": "finetune", "step": 9, "lo')
  train.run(tiny_config(data_dir), workdir)
  resumed = read_metrics(workdir)
  keys = [(r["stage"], r["step"]) for r in resumed]
  assert len(keys) == len(set(keys)) == len(records)
  assert sorted(keys) == sorted((r["stage"], r["step"]) for r in records)
  assert [r["step"] for r in resumed if r["stage"] == "eval"] == [3, 6]
  assert sorted(os.listdir(os.path.join(workdir, "finetune", "checkpoints"))) == ["4", "8"]


def test_truncate_metrics_keeps_what_the_checkpoint_covers(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [dict(stage="pretrain", step=s) for s in (1, 2, 3)] + \
      [dict(stage="finetune", step=s) for s in (1, 2, 3)] + [dict(stage="eval", step=2),
                                                            dict(stage="eval", step=3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  mtime = path.stat().st_mtime_ns
  assert workdir_lib.truncate_metrics(str(tmp_path), "finetune", 3) == 0
  assert path.stat().st_mtime_ns == mtime  # nothing to drop: not rewritten
  assert workdir_lib.truncate_metrics(str(tmp_path), "finetune", 2) == 2
  assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:5] + lines[6:7]
  assert workdir_lib.truncate_metrics(str(tmp_path), "pretrain", 0) == 3
  # A last line a kill cut short is dropped; one that only lacks its newline is kept.
  with open(path, "a") as f:
    f.write('{"stage": "pretrain", "step": 1}')
  assert workdir_lib.truncate_metrics(str(tmp_path), "finetune", 5) == 0
  assert path.read_text().endswith('{"stage": "pretrain", "step": 1}\n')
  with open(path, "a") as f:
    f.write('{"stage": "pretr')
  assert workdir_lib.truncate_metrics(str(tmp_path), "finetune", 5) == 1
  assert [json.loads(x)["stage"] for x in path.read_text().splitlines()] == [
      "finetune", "finetune", "eval", "pretrain"]
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# 4. A skipped, complete stage rewrites nothing.
# ---------------------------------------------------------------------------------------------
def test_complete_stages_rewrite_nothing(data_dir, trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = listing(workdir)
  result = train.run(tiny_config(data_dir), workdir)  # both stages skipped, eval runs
  after = listing(workdir)
  assert {k for k in after if after[k] != before[k]} | {"."} == {".", "eval.json"}
  assert set(after) == set(before)
  assert result["checkpoint"] == os.path.join(workdir, "finetune", "checkpoints", "8")
  config = tiny_config(data_dir)
  config.stages = ("pretrain", "finetune")  # no eval: not even eval.json
  before = listing(workdir)
  train.run(config, workdir)
  after = listing(workdir)  # config.json follows the changed stages, nothing else changes
  assert {k for k in after if after[k] != before[k]} == {".", "config.json"}
  train.run(config, workdir)
  assert listing(workdir) == after
