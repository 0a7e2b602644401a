"""Our own parameter directories: a model's nnx.Param tree on disk, and the model it belongs to.

One format for every parameter directory this project writes, the converter's output
(`python -m swinv2_jax.weights`) and the pretraining stage's `WORKDIR/pretrain/encoder`:

    DIR/             an orbax `StandardCheckpointer` checkpoint (`checkpointing.save_tree`) of the
                     parameters as a pure dict (`nnx.to_pure_dict`: nested by module path, list
                     indices as keys, the model's parameter dtypes)
    DIR/model.json   {"model": preset name, "overrides": {constructor arguments}}; written by
                     the converter and needed only by `restore_model`

Both kinds are read by `read_params` (through `load_params` for a model), so either one serves
wherever the other does; so does a training stage's checkpoint (`find_params`: its train state
holds the parameters under `params`, their EMA under `ema`). The classifier head follows
`heads.check_head` in every one of them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
from etils import epath
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import models
from swinv2_jax import paths
from swinv2_jax.weights import heads

MODEL_JSON = "model.json"
STATE_ITEM = "state"  # the train state's item in a CheckpointManager step (checkpointing.save)


def save_params(directory: str, model, model_config: Mapping[str, Any] | None = None) -> str:
  """Writes the model's nnx.Param state to `directory`, and `directory/model.json` with
  `model_config` (the constructor arguments; see `restore_model`).

  Returns the absolute directory (a gs:// URL as it is).
  """
  directory = paths.absolute(directory)
  checkpointing.save_tree(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  # After the save: orbax replaces the whole directory.
  (epath.Path(directory) / MODEL_JSON).write_text(
      json.dumps(dict(model_config or {}), indent=2, sort_keys=True))
  return directory


def load_model_config(directory: str) -> dict:
  return json.loads((epath.Path(directory) / MODEL_JSON).read_text())


def find_params(directory: str) -> tuple[str, str]:
  """(tree checkpoint, subtree) that hold the parameters in `directory`:

  - a parameter directory (the converter's output, a pretrain stage's `pretrain/encoder`):
    (directory, '');
  - a step of a training stage's checkpoints (`WORKDIR/finetune/checkpoints/300`):
    (directory/state, 'params');
  - a stage's checkpoint directory (`WORKDIR/finetune/checkpoints`): its latest step's.

  FileNotFoundError where it holds none of these. Reads only.
  """
  path = epath.Path(directory)
  if (path / STATE_ITEM).is_dir():
    return str(path / STATE_ITEM), "params"
  step = checkpointing.latest_step(str(path)) if path.is_dir() else None
  if step is not None and (path / str(step) / STATE_ITEM).is_dir():
    return str(path / str(step) / STATE_ITEM), "params"
  if checkpointing.tree_metadata(str(path)) is None:
    raise FileNotFoundError(f"no orbax parameter checkpoint at {path}")
  return str(path), ""


def head_classes(tree) -> int:
  """Classes of the classifier head of a parameter tree (arrays or their metadata); 0: none."""
  head = tree.get("head") if hasattr(tree, "get") else None
  return int(head["kernel"].shape[-1]) if head else 0


def read_params(directory: str, abstract: dict, *, drop_head: bool = False, shardings=None,
                subtree: str | None = None) -> dict:
  """The parameters `abstract` describes (the model's pure dict of ShapeDtypeStructs), read from
  `directory` (any kind `find_params` knows) or from `subtree` of its train state ('ema').

  The head follows `heads.check_head`; where it is not loaded, the result has no 'head' and
  the model keeps its own. Any other missing, extra or mis-shaped parameter is a ValueError
  naming each; `shardings` (a tree like `abstract`) places the arrays, else they are numpy.
  """
  tree_dir, found = find_params(directory)
  subtree = subtree or found
  saved = checkpointing.saved_tree(tree_dir)
  skip = [k for k in saved if k != subtree] if subtree else []  # e.g. the optimizer state
  if subtree:
    if subtree not in saved:
      raise ValueError(f"the train state in {tree_dir} has no {subtree!r} (it has "
                       f"{', '.join(sorted(saved))})")
    saved = saved[subtree]
  keep = lambda tree: tree
  if not heads.check_head(head_classes(saved), head_classes(abstract), drop_head):
    keep = lambda tree: {k: v for k, v in tree.items() if k != "head"}
    skip += [f"{subtree}.head" if subtree else "head"] if "head" in saved else []
  wrap = (lambda tree: {subtree: keep(tree)}) if subtree else keep
  loaded = checkpointing.load_tree(tree_dir, wrap(abstract),
                                   None if shardings is None else wrap(shardings),
                                   skip=tuple(skip))
  return loaded[subtree] if subtree else loaded


def load_params(directory: str, model, *, drop_head: bool = False):
  """Restores the parameters in `directory` (see `read_params`) onto `model` (in place; returns
  it). With drop_head the model keeps its own head, which must then be concrete."""
  state = nnx.state(model, nnx.Param)
  # Shapes and dtypes only: the model may be abstract (nnx.eval_shape) or concrete.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nnx.to_pure_dict(state))
  loaded = read_params(directory, abstract, drop_head=drop_head)
  if "head" in abstract and "head" not in loaded and isinstance(
      model.head.kernel.get_value(), jax.ShapeDtypeStruct):
    raise ValueError("the model is abstract (nnx.eval_shape) and its head would stay "
                     "uninitialised: drop_head needs a concrete model")
  nnx.replace_by_pure_dict(state, loaded)
  nnx.update(model, state)
  return model


def restore_model(directory: str, **overrides):
  """Builds the model recorded in `directory/model.json` and restores its parameters.

  The model is built abstractly (nnx.eval_shape: no random init, no second copy in memory)
  and every parameter then comes from the checkpoint.
  """
  config = load_model_config(directory)
  kwargs = {**config.get("overrides", {}), **overrides}
  model = nnx.eval_shape(lambda: models.create(config["model"], **kwargs))
  return load_params(directory, model)
