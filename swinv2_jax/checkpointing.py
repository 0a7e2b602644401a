"""Orbax checkpoints of a training stage: the sharded train state and the input position.

Each stage has its own CheckpointManager (async, keep-N). A checkpoint holds two items:
`state` (restored through an abstract target that carries the current mesh's shardings, so a
run may resume on another device count) and `data` (grain's iterator state, per process), so
a resumed run neither repeats nor skips examples.

`save_tree` / `load_tree` write and read a plain pytree: the one on-disk format of parameter
directories (see `swinv2_jax.weights.export`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int, use_async: bool,
            create: bool = True) -> ocp.CheckpointManager:
  """A stage's manager; `create=False` for one that only restores (it writes nothing until it
  saves, which is when it also deletes checkpoints beyond `keep`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                         create=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data"))


def latest_step(directory: str) -> int | None:
  """The latest finalized checkpoint step in `directory` (None: none); reads only."""
  if not os.path.isdir(directory):
    return None
  return max(ocp.path.step.checkpoint_steps(directory), default=None)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings,
            data_iterator=None):
  """Restores `state` onto `shardings` (and the iterator in place, when given)."""
  items = dict(state=ocp.args.StandardRestore(abstract_with_shardings(abstract_state, shardings)))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for a damaged directory
    raise RuntimeError(
        f"cannot restore the checkpoint in {step_dir(mngr, step)}: {type(e).__name__}: {e}. "
        f"If that step directory is damaged, move it out of {mngr.directory} to resume from "
        f"the checkpoint before it.") from e
  return restored["state"]


def save_tree(directory: str, tree, step: int | None = None) -> None:
  """A plain pytree (e.g. exported encoder parameters), written synchronously; `step` (the
  training step it comes from) is recorded for `tree_step`."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=True,
               custom_metadata=None if step is None else {"step": int(step)})


def tree_metadata(directory: str) -> dict | None:
  """The custom metadata of a complete tree checkpoint at `directory` ({} when it has none);
  None where there is no such checkpoint, or only part of one. Reads only."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
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


def _flatten_dict(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten_dict(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _check_fits(path: str, saved_tree, wanted_tree) -> None:
  """Raises one ValueError naming every leaf that is missing, extra or of another shape."""
  saved = {k: tuple(v.shape) for k, v in _flatten_dict(dict(saved_tree)).items()}
  wanted = {k: tuple(v.shape) for k, v in _flatten_dict(wanted_tree).items()}
  problems = []
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing:
    problems.append("not in the checkpoint: " + ", ".join(".".join(k) for k in missing))
  if extra:
    problems.append("not in the model: " + ", ".join(".".join(k) for k in extra))
  for k in sorted(set(saved) & set(wanted)):
    if saved[k] != wanted[k]:
      problems.append(f"shape mismatch for {'.'.join(k)}: checkpoint {saved[k]} vs model "
                      f"{wanted[k]}")
  if problems:
    raise ValueError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))


def load_tree(directory: str, abstract_tree, shardings=None):
  """Restores a `save_tree` directory onto `abstract_tree` (a nested dict of arrays or
  ShapeDtypeStructs), placed on `shardings` when given, else on the default device.

  The saved tree must have exactly the same names and shapes; otherwise a ValueError names
  every mismatch. FileNotFoundError where `directory` holds no such checkpoint.
  """
  path = os.path.abspath(directory)
  missing = FileNotFoundError(f"no orbax parameter checkpoint at {path}")
  if not os.path.isdir(path):
    raise missing
  target = abstract_tree if shardings is None else abstract_with_shardings(abstract_tree,
                                                                           shardings)
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(path)
    saved_tree = getattr(metadata, "item_metadata", metadata)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    if saved_tree is None:  # a directory, but no checkpoint in it: orbax only logs a warning
      raise missing
    _check_fits(path, saved_tree, abstract_tree)
    return ckptr.restore(path, target)
