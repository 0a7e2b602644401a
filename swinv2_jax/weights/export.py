"""Our own parameter directories: a model's nnx.Param tree on disk, and the model it belongs to.

One format for every parameter directory this project writes, the converter's output
(`python -m swinv2_jax.weights`) and the pretraining stage's `WORKDIR/pretrain/encoder`:

    DIR/             an orbax `StandardCheckpointer` checkpoint (`checkpointing.save_tree`) of the
                     parameters as a pure dict (`nnx.to_pure_dict`: nested by module path, list
                     indices as keys, the model's parameter dtypes)
    DIR/model.json   {"model": preset name, "overrides": {constructor arguments}}; written by
                     the converter and needed only by `restore_model`

Both kinds are read by `checkpointing.load_tree` (through `load_params` here, or directly where
train.py fine-tunes from `pretrain/encoder`), so either one serves wherever the other does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import models

MODEL_JSON = "model.json"


def save_params(directory: str, model, model_config: Mapping[str, Any] | None = None) -> str:
  """Writes the model's nnx.Param state to `directory`, and `directory/model.json` with
  `model_config` (the constructor arguments; see `restore_model`).

  Returns the absolute directory.
  """
  directory = os.path.abspath(directory)
  checkpointing.save_tree(directory, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  # After the save: orbax replaces the whole directory.
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump(dict(model_config or {}), f, indent=2, sort_keys=True)
  return directory


def load_model_config(directory: str) -> dict:
  with open(os.path.join(os.path.abspath(directory), MODEL_JSON)) as f:
    return json.load(f)


def load_params(directory: str, model):
  """Restores a parameter directory onto `model` (in place; returns it).

  The saved tree must have exactly the model's parameter names and shapes; otherwise a
  ValueError names every mismatch (FileNotFoundError where there is no checkpoint).
  """
  state = nnx.state(model, nnx.Param)
  # Shapes and dtypes only: the model may be abstract (nnx.eval_shape) or concrete.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, checkpointing.load_tree(directory, abstract))
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
