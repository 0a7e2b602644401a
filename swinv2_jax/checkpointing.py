"""Orbax checkpoints of a training stage: the sharded train state and the input position.

Each stage has its own CheckpointManager (async, keep-N). A checkpoint holds two items:
`state` (restored through an abstract target that carries the current mesh's shardings, so a
run may resume on another device count) and `data` (grain's iterator state, per process), so
a resumed run neither repeats nor skips examples.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, keep: int, use_async: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=use_async, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data"))


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
        f"cannot restore checkpoint step {step} from {mngr.directory}: {type(e).__name__}: "
        f"{e}. If it is corrupt, move that step's folder away to resume from the one "
        f"before it.") from e
  return restored["state"]


def save_tree(directory: str, tree) -> None:
  """A plain pytree (e.g. exported encoder parameters), written synchronously."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=True)


def load_tree(directory: str, abstract_tree, shardings=None):
  target = abstract_tree if shardings is None else abstract_with_shardings(abstract_tree,
                                                                           shardings)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), target)
