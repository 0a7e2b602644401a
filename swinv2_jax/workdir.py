"""The workdir contract: what a rerun on the same --workdir may change, and what it rewrites.

A workdir holds the training of one configuration (`config.json`). Once a stage has saved a
checkpoint, a rerun must bring the same config, except for the keys in `RESUMABLE` (none of them
changes the function a stage trains) and a stage's `steps` (which may grow, or shrink down to
that stage's latest checkpoint). A stage's own keys (`pretrain.*`, `finetune.*`) stay free
until that stage has a checkpoint (e.g. a lower `finetune.base_lr` after a fine-tune that
diverged before its first one, on a workdir whose pretraining is done); the shared keys
(`model.*`, `data.*`, `seed`, ...) until any stage has one.

Every check here only reads; the writes (`save_config`, `truncate_metrics`, `write_json`)
replace a file atomically and run on process 0 only. A workdir is a local folder or a gs://
URL: every path goes through `swinv2_jax.paths` (etils.epath).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import errors
from swinv2_jax import paths
from swinv2_jax.weights import export
from swinv2_jax.weights import hub
from swinv2_jax.weights import readers
from swinv2_jax.config import ConfigError, flatten

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
TRAINING_STAGES = ("pretrain", "finetune")

# Keys a rerun may change on a workdir that holds checkpoints: none of them changes what a stage
# computes from its checkpoint on. A name ending in "." covers the whole group.
RESUMABLE = (
    # When the loop logs and saves: neither changes the update, and a checkpoint holds the same
    # state and input position whenever it is taken.
    "pretrain.log_every", "finetune.log_every",
    "pretrain.checkpoint_every", "finetune.checkpoint_every",
    # TensorBoard's SimMIM images: drawn from a batch by their own jitted function, outside the
    # update step, which they neither change nor wait for.
    "pretrain.image_every",
    # Evaluations while fine-tuning read the parameters and change nothing.
    "finetune.eval_every",
    # Only what a non-finite step does (stop, or keep the state as it was); a finite step
    # makes the same update either way.
    "pretrain.skip_nonfinite", "finetune.skip_nonfinite",
    # How many checkpoints are kept, written in the background or not.
    "checkpoint.",
    # Which stages run and what the eval stage reads; no stage's training depends on them.
    "stages", "eval_only", "eval_checkpoint", "dry_run",
    # Evaluation sums over the valid examples only: the batch size does not change the result.
    "eval.batch_size",
    # How processes find each other.
    "distributed.",
    # The layout of the same computation over the devices; a checkpoint restores onto any
    # layout, as it does onto another device count.
    "mesh.",
    # The same global batch in other microbatches: the same mean gradient up to float
    # rounding, as on another device count.
    "pretrain.accum_steps", "finetune.accum_steps",
    # Memory for time: recomputation in the backward pass and attention in sequential pieces of
    # windows compute the same function.
    "model.remat", "model.attention_chunks",
    # The fused attention of unshifted windows computes the einsums' function up to float
    # rounding (the logit scale folded into q; tests/test_attention.py).
    "model.attention_impl",
    # The dry run's inputs. plan.device_memory_gb also bounds the microbatch that
    # accum_steps='auto' picks, which (like the device count a run resumes on) splits the same
    # global batch otherwise, with the same schedule and model.
    "plan.",
    # Read only by the command that prepares a data set, never by a run.
    "data.manual_dir",
    # How many workers decode, how far ahead: the stream is a function of (seed, step) alone
    # (data/pipeline.py), whatever reads it.
    "data.num_workers", "data.num_threads", "data.prefetch",
)
MAX_LISTED = 8  # differing keys named in the refusal; the rest are counted


def is_resumable(key: str) -> bool:
  return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def owner(key: str) -> str | None:
  """The training stage a key belongs to alone, or None for a key shared by the stages."""
  head = key.split(".", 1)[0]
  return head if head in TRAINING_STAGES else None


# ---------------------------------------------------------------------------------------------
# What the workdir holds (read only).
# ---------------------------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
  """Raises a UserError where --workdir cannot hold a run: an object store whose checkpoints
  orbax cannot write, or a bucket that does not exist. Reads only (a missing bucket is never
  created)."""
  scheme = paths.scheme(workdir)
  if scheme is None:
    return
  if scheme not in paths.CHECKPOINT_SCHEMES:
    raise errors.UserError(
        f"--workdir: {scheme}:// is not supported: orbax {ocp.__version__} writes checkpoints "
        f"to local paths and gs:// only; use --workdir=gs://BUCKET/PATH or a local folder")
  name = workdir.split("://", 1)[1].split("/", 1)[0]
  bucket = f"{scheme}://{name}"
  try:
    found = bool(name) and epath.Path(bucket).exists()
  except Exception as e:  # pylint: disable=broad-except  (credentials, network, permissions)
    raise errors.UserError(f"--workdir: cannot read the bucket {bucket}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if not found:
    raise errors.UserError(
        f"--workdir: the bucket {bucket} does not exist or these credentials cannot see it; "
        f"create it (gcloud storage buckets create {bucket}) or fix the name")


def checkpoint_dir(workdir: str, stage: str) -> str:
  return paths.join(workdir, stage, "checkpoints")


def encoder_dir(workdir: str) -> str:
  return paths.join(workdir, "pretrain", "encoder")


def latest_steps(workdir: str) -> dict[str, int | None]:
  """The latest checkpoint step of each training stage (None: none), creating nothing."""
  return {stage: checkpointing.latest_step(checkpoint_dir(workdir, stage))
          for stage in TRAINING_STAGES}


def trained_stages(workdir: str, latest: Mapping[str, int | None]) -> set[str]:
  """The training stages whose keys the workdir is bound to: those with a checkpoint (and
  pretraining when its encoder is there)."""
  trained = {stage for stage, step in latest.items() if step is not None}
  if epath.Path(encoder_dir(workdir)).is_dir():
    trained.add("pretrain")
  return trained


# ---------------------------------------------------------------------------------------------
# config.json against the new config.
# ---------------------------------------------------------------------------------------------
def config_json(config) -> dict:
  """The config as config.json holds it (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> dict | None:
  path = epath.Path(workdir) / CONFIG_JSON
  if not path.exists():
    return None
  return json.loads(path.read_text())


def check_config(new: dict, workdir: str, latest: Mapping[str, int | None]) -> list[str]:
  """Compares the new config (`config_json`) with WORKDIR/config.json.

  Raises ConfigError (one line naming every differing key) where the workdir's checkpoints do
  not allow a difference; returns the log lines of the accepted changes.
  """
  path = paths.join(workdir, CONFIG_JSON)
  trained = trained_stages(workdir, latest)
  new_flat = flatten(new)
  below = {}  # a stage's steps below its latest checkpoint: refused whatever config.json says
  for stage in TRAINING_STAGES:
    steps, step = new_flat.get(f"{stage}.steps"), latest.get(stage)
    if step is not None and isinstance(steps, int) and steps < step:
      below[f"{stage}.steps"] = f"below its checkpoint at step {step}"
  old = read_config(workdir)
  old_flat = {} if old is None else flatten(old)
  keys = set(below) if old is None else set(old_flat) | set(new_flat) | set(below)
  refused, notes, free, schedules = [], [], [], []
  for key in sorted(keys):
    a, b = old_flat.get(key, config_lib.ABSENT), new_flat.get(key, config_lib.ABSENT)
    if (key not in below and a is not config_lib.ABSENT and b is not config_lib.ABSENT
        and config_lib.same_value(a, b)):
      continue
    change = f"{key} ({config_lib.show_value(a)} -> {config_lib.show_value(b)})"
    stage = owner(key)
    if key in below:
      was = "" if a is config_lib.ABSENT else f"{config_lib.show_value(a)} -> "
      refused.append(f"{key} ({was}{config_lib.show_value(b)}: {below[key]})")
    elif is_resumable(key):
      notes.append(change)
    elif key.endswith(".steps") and stage and latest.get(stage) is not None:
      step = latest[stage]
      schedules.append(f"{stage}: steps {config_lib.show_value(a)} -> {b}: " + (
          f"the stage ends at its step-{step} checkpoint" if b == step else
          f"the lr schedule is re-laid over {b} steps from step {step}"))
    elif (stage in trained) if stage else bool(trained):
      refused.append(change)
    else:
      free.append(change)
  if refused:
    more = f" and {len(refused) - MAX_LISTED} more" if len(refused) > MAX_LISTED else ""
    where = f"differs from {path}" if old is not None else f"does not fit {workdir}"
    raise ConfigError(f"config {where} in: {', '.join(refused[:MAX_LISTED])}{more}; use a new "
                      f"--workdir, or set them back")
  lines = list(schedules)
  if old is None and trained:
    lines.append(f"{path} was missing from a workdir with checkpoints: written from this config")
  if notes:
    lines.append(f"{CONFIG_JSON} updated: " + "; ".join(notes))
  if free:
    untrained = " or ".join(sorted({owner(c.split(" ", 1)[0]) for c in free})) if trained \
        else "any stage"
    lines.append(f"{CONFIG_JSON} updated: {', '.join(free)} (no checkpoint of {untrained} yet)")
  return lines


def save_config(workdir: str, new: dict) -> bool:
  """Writes config.json (process 0) unless it already holds this config; True if written."""
  old = read_config(workdir)
  if old is not None:
    old_flat, new_flat = flatten(old), flatten(new)
    if old_flat.keys() == new_flat.keys() and all(config_lib.same_value(old_flat[k], v)
                                                  for k, v in new_flat.items()):
      return False
  write_json(paths.join(workdir, CONFIG_JSON), new)
  return True


# ---------------------------------------------------------------------------------------------
# Atomic writes and metrics.jsonl.
# ---------------------------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
  """`obj` as indented JSON at `path`, replaced atomically (process 0 only)."""
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps(obj, indent=2))


def _records(path: str):
  """(line, record or None) for each line of a metrics file; None for a line cut by a kill."""
  with epath.Path(path).open() as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      yield line, record if isinstance(record, dict) else None


def truncate_metrics(workdir: str, stage: str, step: int) -> int:
  """Before a stage trains on from its checkpoint at `step` (0: from the start), drops the
  records it logged after that step (and, for fine-tuning, the evaluations made at its steps
  after it), and any line a kill cut short. Process 0; returns the number of lines dropped."""
  path = paths.join(workdir, METRICS_JSONL)
  if jax.process_index() != 0 or not epath.Path(path).exists():
    return 0
  stages = (stage, "eval") if stage == "finetune" else (stage,)
  kept, dropped, whole = [], 0, True
  for line, record in _records(path):
    whole = line.endswith("\n")
    if record is None or (record.get("stage") in stages and record.get("step", 0) > step):
      dropped += 1
    else:
      kept.append(line if line.endswith("\n") else line + "\n")
  if dropped or not whole:
    paths.write_text(path, "".join(kept))
  return dropped


def eval_records(workdir: str, up_to_step: int) -> list[dict]:
  """The evaluations made while fine-tuning up to a step, one per step (metrics.jsonl)."""
  path = paths.join(workdir, METRICS_JSONL)
  if not epath.Path(path).exists():
    return []
  records = {}
  for _, r in _records(path):
    if r and r.get("stage") == "eval" and "top1" in r and r["step"] <= up_to_step:
      records[r["step"]] = r
  return [records[k] for k in sorted(records)]


# ---------------------------------------------------------------------------------------------
# What the stages that will run read.
# ---------------------------------------------------------------------------------------------
def _check_readable(key: str, path: str) -> None:
  if hub.is_hub_id(path):  # fetched where train.run loads it, still before its first write
    try:
      hub.timm_model_name(path)
    except hub.HubError as e:
      raise ConfigError(f"config.{key}: {e}") from e
    return
  if not epath.Path(path).exists():
    raise ConfigError(f"config.{key}: {path} does not exist; give a .safetensors or .pth file, "
                      f"an hf-hub:<owner>/<name> id, or a parameter or checkpoint directory")
  if epath.Path(path).is_dir():
    if paths.is_local(path) and not os.access(path, os.R_OK | os.X_OK):
      raise ConfigError(f"config.{key}: the directory {path} is not readable")
    try:
      export.find_params(path)
    except FileNotFoundError:
      raise ConfigError(f"config.{key}: {path} is a directory but no parameter checkpoint "
                        f"(as `python -m swinv2_jax.weights` writes, a pretrain stage's "
                        f"encoder, or a fine-tune checkpoint)") from None
  elif not paths.is_local(path):
    raise ConfigError(f"config.{key}: {path}: weight files are read from a local disk; copy it "
                      f"to one (a parameter directory may be on gs://)")
  elif not os.access(path, os.R_OK):
    raise ConfigError(f"config.{key}: {path} is not readable")
  else:
    try:  # the header alone: a truncated download is named before anything loads
      readers.check_checkpoint_file(path)
    except ValueError as e:
      raise ConfigError(f"config.{key}: {e}") from e


def check_inputs(config, workdir: str, stages, latest: Mapping[str, int | None]) -> None:
  """Raises ConfigError where a stage that will run lacks what it reads: fine-tuning that
  starts (no checkpoint yet) from `finetune.init`, an evaluation without fine-tuning from
  `eval_checkpoint` or the workdir's fine-tune checkpoint."""
  if "finetune" in stages and latest.get("finetune") is None:
    init = config.finetune.init
    if init == "pretrain":
      if "pretrain" not in stages and not epath.Path(encoder_dir(workdir)).is_dir():
        raise ConfigError(
            f"config.finetune.init: 'pretrain', but {encoder_dir(workdir)} does not exist and "
            f"config.stages has no 'pretrain': run the pretrain stage first, or set "
            f"finetune.init to 'scratch' or a checkpoint path")
    elif init != "scratch":
      _check_readable("finetune.init", init)
  if "eval" in stages and "finetune" not in stages:
    if config.eval_checkpoint:
      _check_readable("eval_checkpoint", config.eval_checkpoint)
    elif latest.get("finetune") is None:
      raise ConfigError(
          f"config.eval_checkpoint: empty, and no fine-tuning checkpoint in "
          f"{checkpoint_dir(workdir, 'finetune')} to evaluate: run the finetune stage first, "
          f"or set config.eval_checkpoint to a checkpoint path")
