"""The weights a run starts from and the weights it evaluates.

- `config.finetune.init`: 'scratch', 'pretrain' (this workdir's `pretrain/encoder`), or a
  source below;
- `config.eval_checkpoint`: a source below, else this workdir's latest fine-tune checkpoint.

A source is a PyTorch checkpoint file (.safetensors, .pth, .bin: `weights.readers`), an
`hf-hub:<owner>/<name>` id (`weights.hub`), a parameter directory (the converter's output, any
workdir's `pretrain/encoder`) or a fine-tune checkpoint (`WORKDIR/finetune/checkpoints/300`, or
that checkpoints directory for its latest step; `weights.find_params`). One that does not fit
the configured model or data set is a ConfigError of one line naming the key that fixes it,
raised before the run writes anything (train.run loads these first).
"""

from __future__ import annotations

import contextlib

from etils import epath
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import errors
from swinv2_jax import models
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights
from swinv2_jax import workdir as workdir_lib
from swinv2_jax.weights import hub

Params = trainer_lib.Params
# The constructor arguments that fix a SwinV2's parameters (sizes and windows do not).
_ARCHITECTURE = dict(embed_dim=None, depths=None, num_heads=None, patch_size=4,
                     extra_norm_period=0)


def _is_directory(source: str) -> bool:
  return not hub.is_hub_id(source) and epath.Path(source).is_dir()


def _plain(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _show(args: dict) -> str:
  return ", ".join(f"{k} {_plain(v)}" for k, v in args.items())


def check_hub_model(config, key: str, source: str) -> None:
  """A ConfigError where a timm hub id names a preset of another architecture than
  config.model.* builds; checked before anything is fetched."""
  name = hub.timm_model_name(source)
  if name not in models.PRESETS:
    return
  theirs = {k: models.PRESETS[name].get(k, default) for k, default in _ARCHITECTURE.items()}
  ours = config_lib.model_args(config, "finetune")
  ours = {k: ours.get(k, default) for k, default in _ARCHITECTURE.items()}
  differ = [k for k in _ARCHITECTURE if _plain(theirs[k]) != _plain(ours[k])]
  if differ:
    raise config_lib.ConfigError(
        f"config.{key}: {source} holds a {name} ({_show({k: theirs[k] for k in differ})}) but "
        f"config.model.* builds {_show({k: ours[k] for k in differ})}: set "
        f"config.model.name={name} and leave config.model.{', '.join(differ)} unset")


@contextlib.contextmanager
def _refusals(key: str, source: str, head_error, fix: str):
  """Turns what loading `source` raises into one ConfigError line naming config.<key>."""
  try:
    yield
  except config_lib.ConfigError:
    raise
  except weights.HeadMismatchError as e:
    raise head_error(e) from e
  except errors.UserError as e:  # a file or hub id that cannot be read says why itself
    raise config_lib.ConfigError(f"config.{key}: {e}") from e
  except ValueError as e:  # missing, unexpected or mis-shaped weights
    details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
    shown = f"{details[0]}, and {len(details) - 1} more" if len(details) > 1 else (
        details[0] if details else str(e))
    raise config_lib.ConfigError(f"config.{key}: {source} does not fit the model ({fix}): "
                                 f"{shown}") from e


def _file_params(config, key: str, source: str, num_classes: int, drop_head: bool) -> Params:
  """A PyTorch checkpoint file or hub id, as the classifier's parameter tree."""
  if hub.is_hub_id(source):
    check_hub_model(config, key, source)
  stage = "finetune" if key == "finetune.init" else "eval"
  build = lambda: trainer_lib.build_classifier(config, stage, num_classes)
  # Every parameter comes from the file unless the head is dropped: then the model's own is
  # initialised, else nothing is.
  model = build() if drop_head else nnx.eval_shape(build)
  weights.load_pytorch_weights(model, source, drop_head=drop_head)
  return trainer_lib.split_params(model)[1]


def finetune_init_params(config, workdir: str, num_classes: int, layout) -> Params | None:
  """The parameters fine-tuning starts from (None: its own init), placed on the layout. A
  dropped head is left out of a directory's tree: the fine-tune state's own head stays."""
  init = config.finetune.init
  if init == "scratch":
    return None
  source, drop_head = init, config.finetune.drop_head
  if init == "pretrain":
    source, drop_head = workdir_lib.encoder_dir(workdir), True  # an encoder has no head
    if not epath.Path(source).is_dir():
      raise FileNotFoundError(
          f"finetune.init='pretrain' but {source} does not exist: run the pretrain stage "
          f"first, or set finetune.init='scratch' or a checkpoint path")
  head_error = lambda e: config_lib.ConfigError(
      f"config.finetune.init: {source} does not fit the model (set config.finetune.drop_head="
      f"True to train a new {num_classes}-class head): " + (
          f"its head has {e.checkpoint_classes} classes, data set {config.data.name!r} "
          f"{num_classes}" if e.checkpoint_classes else "it has no classifier head"))
  with _refusals("finetune.init", source, head_error, "set config.model.* to the checkpoint's "
                 "architecture, or use another finetune.init"):
    if not _is_directory(source):
      return _file_params(config, "finetune.init", source, num_classes, drop_head)
    model = nnx.eval_shape(lambda: trainer_lib.build_classifier(config, "finetune",
                                                                num_classes))
    abstract = trainer_lib.split_params(model)[1]
    return weights.read_params(source, abstract, drop_head=drop_head,
                               shardings=layout.params(abstract))


def _eval_head_error(config, path: str, e: weights.HeadMismatchError):
  """At evaluation a new head would be random, so drop_head is no fix: a fine-tune on this
  data set is, or the data set the head was trained on."""
  finetune = (f"config.finetune.init={path}, config.finetune.drop_head=True, "
              "config.stages=('finetune', 'eval')")
  if not e.checkpoint_classes:
    return config_lib.ConfigError(
        f"config.eval_checkpoint: {path} has no classifier head (a pretrain encoder or SimMIM "
        f"checkpoint): fine-tune it on this data set first ({finetune})")
  return config_lib.ConfigError(
      f"config.eval_checkpoint: {path} classifies {e.checkpoint_classes} classes but data set "
      f"{config.data.name!r} has {e.model_classes}: evaluate it on the data set it was trained "
      f"on (config.data.*), or fine-tune it on this one first ({finetune})")


def load_eval_params(config, workdir: str, num_classes: int, layout):
  """Parameters to evaluate: config.eval_checkpoint, else the workdir's latest fine-tune.

  Returns (params, ema params or None, source, fine-tune step or None).
  """
  path = config.eval_checkpoint
  if not path:
    return load_finetune_params(config, workdir, num_classes, layout)
  ema = None
  with _refusals("eval_checkpoint", path, lambda e: _eval_head_error(config, path, e),
                 "set config.model.* to the checkpoint's architecture"):
    if not _is_directory(path):
      params = _file_params(config, "eval_checkpoint", path, num_classes, drop_head=False)
    else:
      model = nnx.eval_shape(lambda: trainer_lib.build_classifier(config, "eval", num_classes))
      abstract = trainer_lib.split_params(model)[1]
      params = weights.read_params(path, abstract)
      tree_dir, subtree = weights.find_params(path)
      if subtree and "ema" in checkpointing.saved_tree(tree_dir):  # evaluated beside params
        ema = weights.read_params(path, abstract, subtree="ema")
  return params, ema, path, None


def load_finetune_params(config, workdir: str, num_classes: int, layout):
  """The workdir's newest intact fine-tune checkpoint, as `load_eval_params` returns it."""
  task = trainer_lib.finetune_task(config, num_classes)
  trainer = trainer_lib.make_trainer(config, task, layout, accum_steps=1)  # state shapes only
  ckpt_dir = workdir_lib.checkpoint_dir(workdir, "finetune")
  mngr = checkpointing.manager(ckpt_dir, keep=config.checkpoint.keep, use_async=False,
                               create=False)
  restored = checkpointing.restore_latest(mngr, trainer.abstract_state, trainer.state_shardings,
                                          what="eval", config=workdir_lib.config_json(config))
  if restored is None:
    raise FileNotFoundError(
        f"no fine-tuning checkpoint in {ckpt_dir} to evaluate: run the finetune stage first "
        f"or set config.eval_checkpoint to a checkpoint path")
  step, state = restored
  return (state["params"], state.get("ema"), checkpointing.step_dir(mngr, step), step)