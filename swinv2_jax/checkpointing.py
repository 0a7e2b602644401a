"""Orbax checkpoints of a training stage: the sharded train state, the data position, the config.

Each stage has its own CheckpointManager (async, keep-N). A checkpoint holds three items:
`state` (restored through an abstract target that carries the current mesh's shardings, so a
run may resume on another device or process count), `data` (the global input position: the
train stream is a function of the step, see data/pipeline.py) and `config` (the run's
config.json, so that a checkpoint that does not fit names the keys that differ).

`restore_latest` falls back past damaged steps: it moves each one aside (into
`<stage>/damaged/`, nothing is deleted), names the step and the cause, and restores the newest
intact one.

`save_tree` / `load_tree` write and read a plain pytree: the one on-disk format of parameter
directories (see `swinv2_jax.weights.export`).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from swinv2_jax import config as config_lib
from swinv2_jax import paths


def manager(directory: str, *, keep: int, use_async: bool,
            create: bool = True) -> ocp.CheckpointManager:
  """A stage's manager; `create=False` for one that only restores (it writes nothing until it
  saves, which is when it also deletes checkpoints beyond `keep`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                         create=create)
  # Handlers named up front, so that a manager that has not saved yet reads each item's
  # metadata (the shapes a restore checks first) as well as one that has.
  handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                  config=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(paths.absolute(directory), options=options,
                               item_handlers=handlers)


def latest_step(directory: str) -> int | None:
  """The latest finalized checkpoint step in `directory` (None: none); reads only."""
  if not epath.Path(directory).is_dir():
    return None
  return max(ocp.path.step.checkpoint_steps(directory), default=None)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return paths.join(mngr.directory, str(step))


def save(mngr: ocp.CheckpointManager, step: int, state, *, data: dict, config: dict) -> None:
  """Starts saving (in the background when the manager is async) at any step."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
      config=ocp.args.JsonSave(config)), force=True)


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings):
  """The `state` of one step, placed on `shardings` (orbax's error when it cannot)."""
  target = abstract_with_shardings(abstract_state, shardings)
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
      "state"]


def _saved_config(mngr: ocp.CheckpointManager, step: int) -> tuple[dict | None, str]:
  """The config saved with a step (its `config` item, else the workdir's config.json)."""
  try:
    return (mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"],
            f"the config saved with {step_dir(mngr, step)}")
  except Exception:  # pylint: disable=broad-except  (a checkpoint from before the item existed)
    path = epath.Path(mngr.directory).parent.parent / "config.json"
    if path.exists():
      return json.loads(path.read_text()), str(path)
  return None, ""


def _misfit(mngr: ocp.CheckpointManager, step: int, abstract_state, config: dict | None):
  """A ConfigError when a readable step holds a state of other names or shapes because it was
  written with another config, listing the config keys that differ; None when it fits.

  Raises (so the step counts as damaged) when its metadata cannot be read, or when it does not
  fit although its config is this one: then it is the checkpoint that is broken.
  """
  saved = mngr.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)
  try:
    _check_fits(step_dir(mngr, step), saved or {}, abstract_state)
    return None
  except ValueError as e:
    problem = str(e).splitlines()[1].strip()
  old, source = _saved_config(mngr, step)
  keys = config_lib.differences(old, config) if old is not None and config is not None else []
  if keys:
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    return config_lib.ConfigError(
        f"the checkpoint {step_dir(mngr, step)} was written with another config: {shown} "
        f"(against {source}); use that config, or a new --workdir")
  if old is None and _shapes(saved or {}):
    return config_lib.ConfigError(
        f"the checkpoint {step_dir(mngr, step)} does not fit this model ({problem[:200]}); use "
        f"the config it was written with, or a new --workdir")
  raise ValueError(f"its state does not match its own config ({problem[:200]})")


def check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state, config: dict) -> None:
  """Raises the ConfigError of a step written with another config (see `_misfit`); a damaged
  step passes here: `restore_latest` falls back past it."""
  try:
    misfit = _misfit(mngr, step, abstract_state, config)
  except Exception:  # pylint: disable=broad-except
    return
  if misfit is not None:
    raise misfit


def _agree(ok: bool) -> bool:
  """True on every process when it is True on every process (a lost file may show on one)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step directory into <stage>/damaged/ (process 0; nothing is deleted)."""
  damaged = epath.Path(mngr.directory).parent / "damaged"
  target = str(damaged / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_index() == 0:
    paths.move(step_dir(mngr, step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"swinv2_jax damaged checkpoint {step}")
  mngr.reload()
  return target


def _cause(error: Exception) -> str:
  """The first line of an error and of what it chains from, without TensorStore's dump."""
  parts = []
  while error is not None and len(parts) < 2:
    text = (str(error).splitlines() or [""])[0].split(" See full TensorStore details")[0]
    parts.append(f"{type(error).__name__}: {text[:200]}")
    error = error.__cause__ or error.__context__
  return "; from ".join(parts)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, shardings, *, what: str,
                   config: dict | None = None):
  """(step, state) of the newest step that restores, None when there is none.

  A step that cannot be read (a truncated or deleted file, a half-written directory) is moved
  aside with a warning naming the step and the cause, and the step before it is tried. A step
  that reads but holds another model's state raises a ConfigError naming the config keys that
  differ from the config saved with it (`config`: this run's, as config.json holds it).
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    cause = None
    try:
      misfit = _misfit(mngr, step, abstract_state, config)
      if misfit is not None:
        raise misfit
      state = restore(mngr, step, abstract_state, shardings)
    except config_lib.ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax: many types of damage)
      cause = _cause(e)
    if _agree(cause is None):
      return step, state
    target = _move_aside(mngr, step)
    logging.warning("%s: the checkpoint of step %d cannot be read (%s); moved to %s, trying "
                    "the one before it", what, step, cause or "unreadable on another process",
                    target)
  return None


def save_tree(directory: str, tree, step: int | None = None) -> None:
  """A plain pytree (e.g. exported encoder parameters), written synchronously; `step` (the
  training step it comes from) is recorded for `tree_step`."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(paths.absolute(directory), tree, force=True,
               custom_metadata=None if step is None else {"step": int(step)})


def tree_metadata(directory: str) -> dict | None:
  """The custom metadata of a complete tree checkpoint at `directory` ({} when it has none);
  None where there is no such checkpoint, or only part of one. Reads only."""
  path = paths.absolute(directory)
  if not epath.Path(path).is_dir():
    return None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      metadata = ckptr.metadata(path)
  except Exception:  # pylint: disable=broad-except  (orbax: many types for a partial directory)
    return None
  tree = getattr(metadata, "item_metadata", metadata)
  if getattr(tree, "tree", tree) is None:
    return None
  return dict(getattr(metadata, "custom_metadata", None) or {})


def tree_step(directory: str) -> int | None:
  """The step `save_tree` recorded in the tree checkpoint at `directory`, if any."""
  step = (tree_metadata(directory) or {}).get("step")
  return step if isinstance(step, int) else None


def _shapes(tree) -> dict[str, tuple]:
  """{'params.levels.0.x': shape} of every array (or array metadata) leaf of a pytree; orbax's
  metadata and the abstract state name a namedtuple's fields alike."""
  def name(key):
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))

  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {".".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def _check_fits(path: str, saved_tree, wanted_tree, skip=()) -> None:
  """Raises one ValueError naming every leaf that is missing, extra (outside the subtrees
  named in `skip`) or of another shape."""
  saved, wanted = _shapes(saved_tree), _shapes(wanted_tree)
  problems = []
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(k for k in set(saved) - set(wanted)
                 if not any(k == p or k.startswith(p + ".") for p in skip))
  if missing:
    problems.append("not in the checkpoint: " + ", ".join(missing))
  if extra:
    problems.append("not in the model: " + ", ".join(extra))
  for k in sorted(set(saved) & set(wanted)):
    if saved[k] != wanted[k]:
      problems.append(f"shape mismatch for {k}: checkpoint {saved[k]} vs model "
                      f"{wanted[k]}")
  if problems:
    raise ValueError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))


def saved_tree(directory: str):
  """The structure of the tree checkpoint at `directory` (`save_tree`'s, or the `state` item of
  a manager's step): nested dicts of leaf metadata with `.shape` and `.dtype`. Reads only;
  FileNotFoundError where `directory` holds no such checkpoint."""
  path = paths.absolute(directory)
  missing = FileNotFoundError(f"no orbax parameter checkpoint at {path}")
  if not epath.Path(path).is_dir():
    raise missing
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if tree is None:  # a directory, but no checkpoint in it: orbax only logs a warning
    raise missing
  return tree


def load_tree(directory: str, abstract_tree, shardings=None, *, skip=()):
  """Restores a tree checkpoint (see `saved_tree`) onto `abstract_tree` (a nested dict of
  arrays or ShapeDtypeStructs), placed on `shardings` when given, else as numpy arrays.

  The saved tree must have the same names and shapes; otherwise a ValueError names every
  mismatch. `skip` names saved subtrees (dotted paths: a train state's 'opt_state', a dropped
  'params.head') that are left unread. FileNotFoundError where `directory` holds no checkpoint.
  """
  path = paths.absolute(directory)
  _check_fits(path, saved_tree(path), abstract_tree, skip)
  target = abstract_tree if shardings is None else abstract_with_shardings(abstract_tree,
                                                                           shardings)
  if skip:
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      return ckptr.restore(path, args=args)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)
