"""The top-5 classes of images, with names where the classes have them.

    python -m swinv2_jax.predict --checkpoint=SOURCE [--model=MODEL] IMAGE...
    python -m swinv2_jax.predict --checkpoint=hf-hub:timm/swinv2_tiny_window8_256.ms_in1k cat.jpg
    python -m swinv2_jax.predict --checkpoint=WORKDIR/finetune/checkpoints/300 digit.png

SOURCE is any weights a run reads (swinv2_jax/loading.py): a .safetensors / .pth file, an
hf-hub id, a parameter directory, a fine-tune checkpoint. MODEL is a preset name
(swinv2_jax.models.list_models()), a config file (FILE.py[:ARG]) or a run's config.json; by
default the checkpoint directory's model.json (the converter's), the config.json of the workdir
the checkpoint lies in, or the preset a timm hub id names. The number of classes is the
checkpoint's.

Images are prepared as evaluation prepares them (data/pipeline.py EvalTransform: resize to
size / data.eval_crop_ratio, center crop, normalise), at config.finetune.img_size with the
config's data.* (for a preset: its own size and the ImageNet defaults). Class names: the data
set's (digits 0-9, a folder data set's folder names, a tfds data set's label names), else
ImageNet-1k's for a 1000-class head. A missing or unreadable image is one `error:` line (exit 2).
"""

from __future__ import annotations

import importlib.util
import json
from typing import Sequence

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from etils import epath
from flax import nnx
from PIL import Image

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import errors
from swinv2_jax import logs
from swinv2_jax import models
from swinv2_jax import weights
from swinv2_jax import workdir as workdir_lib
from swinv2_jax.data import sources
from swinv2_jax.data.pipeline import EvalTransform
from swinv2_jax.weights import hub
from swinv2_jax.weights import layouts

TOP_K = 5
IMAGENET_CLASSES = epath.Path(weights.__file__).parent / "imagenet1k_classes.txt"


def _model_error(message: str) -> errors.UserError:
  return errors.UserError(f"--model: {message}")


def _config_from(spec: str) -> ml_collections.ConfigDict:
  """A config file `FILE.py[:ARG]` or a run's config.json."""
  path, colon, arg = spec.partition(":") if not spec.endswith(".json") else (spec, "", "")
  if not epath.Path(path).is_file():
    raise _model_error(f"{spec} is neither a preset ({', '.join(models.list_models()[:3])}, "
                       "...), nor a config file or a run's config.json")
  if path.endswith(".json"):
    return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
  spec_ = importlib.util.spec_from_file_location("swinv2_jax_predict_config", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(*([arg] if colon else []))


def _default_spec(checkpoint: str) -> str:
  """--model when none is given: what the checkpoint says about itself."""
  if hub.is_hub_id(checkpoint):
    name = hub.timm_model_name(checkpoint)
    if name in models.PRESETS:
      return name
  else:
    path = epath.Path(checkpoint)
    model_json = path / weights.MODEL_JSON
    if model_json.exists() and "model" in json.loads(model_json.read_text()):
      return str(model_json)
    # WORKDIR/finetune/checkpoints[/300] or WORKDIR/pretrain/encoder: the run's config.json.
    for parent in list(path.parents)[:3]:
      if (parent / workdir_lib.CONFIG_JSON).exists():
        return str(parent / workdir_lib.CONFIG_JSON)
  raise _model_error(f"needed for {checkpoint}: a preset name, a config file or a run's "
                     "config.json")


def model_setup(spec: str):
  """(constructor arguments without num_classes, data config, image size, whether the data
  config names a data set) of a --model; a preset's is ImageNet's defaults."""
  if spec in models.PRESETS or spec.endswith(weights.MODEL_JSON):
    if spec in models.PRESETS:
      args = models.preset_config(spec)
    else:  # the converter's {"model": preset, "overrides": {...}}
      saved = json.loads(epath.Path(spec).read_text())
      args = models.preset_config(saved["model"], **saved.get("overrides", {}))
    args.pop("num_classes", None)
    return args, data_lib.default_data_config(), config_lib.to_pair(args["img_size"]), False
  config = _config_from(spec)
  return (config_lib.model_args(config, "eval"), config.data,
          config_lib.to_pair(config.finetune.img_size), True)


def _data_set_names(data_cfg) -> list[str] | None:
  try:
    if data_lib.is_folder(data_cfg):
      return sources.folder_class_names(data_cfg)
    feature = sources.tfds_builder(data_cfg).info.features[data_cfg.label_key]
    return list(getattr(feature, "names", None) or []) or None
  except (data_lib.DatasetNotFoundError, ValueError, KeyError):
    return None  # not prepared here (imagenet2012), or no label names


def class_names(data_cfg, num_classes: int) -> list[str] | None:
  """Names in label order: the data set's (`data_cfg`, None for none), else ImageNet-1k's for
  1000 classes, else None."""
  names = _data_set_names(data_cfg) if data_cfg is not None else None
  wordnet_ids = bool(names) and all(n[:1] == "n" and n[1:].isdigit() for n in names)
  if names and len(names) == num_classes and not wordnet_ids:
    return names
  if num_classes == 1000:  # the official weights' classes; tfds knows only their WordNet ids
    return [line.split("\t")[1].split(",")[0] for line in
            IMAGENET_CLASSES.read_text().splitlines()]
  return None


def read_images(paths: Sequence[str], data_cfg, size_hw) -> np.ndarray:
  """The images as the eval pipeline prepares them, (N, H, W, 3) float32; one UserError for
  the first that is missing or unreadable, before any model is built."""
  transform = EvalTransform(data_cfg, size_hw)
  out = []
  for path in paths:
    if not epath.Path(path).is_file():
      raise errors.UserError(f"{path}: no such image file")
    try:
      with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
      raise errors.UserError(f"{path}: not an image PIL can read ({type(e).__name__})") from e
    out.append(transform.map(dict(image=pixels, label=0, valid=True))["image"])
  return np.stack(out)


def _checkpoint_classes(checkpoint: str):
  """(classes of the checkpoint's head, the loadable source: a state dict or a directory)."""
  if not hub.is_hub_id(checkpoint) and epath.Path(checkpoint).is_dir():
    tree_dir, subtree = weights.find_params(checkpoint)
    saved = checkpointing.saved_tree(tree_dir)
    return weights.head_classes(saved[subtree] if subtree else saved), checkpoint
  state = weights.read_state_dict(checkpoint)
  backbone, _, _ = layouts.to_official_layout(state)
  return len(backbone.get("head.weight", ())), state


def load_model(checkpoint: str, args: dict):
  """The classifier of `args` with the checkpoint's head and parameters, in eval mode."""
  num_classes, source = _checkpoint_classes(checkpoint)
  if not num_classes:
    raise errors.UserError(f"--checkpoint: {checkpoint} has no classifier head (a pretrain "
                           "encoder or SimMIM checkpoint): predict needs a fine-tuned one")
  model = nnx.eval_shape(lambda: models.SwinTransformerV2(**args, num_classes=num_classes))
  if isinstance(source, str):
    weights.load_params(source, model)
  else:
    weights.load_pytorch_weights(model, source)
  model.eval()
  return model


@nnx.jit
def _probabilities(model, images):
  return jax.nn.softmax(model(images), axis=-1)


def predict(checkpoint: str, images: Sequence[str], model_spec: str | None = None,
            top_k: int = TOP_K) -> list[list[tuple[int, float, str | None]]]:
  """Per image, the top-k (class index, probability, name or None), most likely first."""
  args, data_cfg, size_hw, named_data = model_setup(model_spec or _default_spec(checkpoint))
  batch = read_images(images, data_cfg, size_hw)
  model = load_model(checkpoint, {**args, "img_size": size_hw})
  probs = np.asarray(_probabilities(model, batch))
  names = class_names(data_cfg if named_data else None, probs.shape[-1])
  out = []
  for row in probs:
    best = np.argsort(-row, kind="stable")[:top_k]
    out.append([(int(i), float(row[i]), names[i] if names else None) for i in best])
  return out


def format_predictions(images: Sequence[str], results) -> str:
  """One block per image: its path, then `  rank. probability  class  name` lines."""
  lines = []
  for path, top in zip(images, results):
    lines.append(path)
    lines += [f"  {rank}. {p:7.2%}  {i:>5}  {name or ''}".rstrip()
              for rank, (i, p, name) in enumerate(top, 1)]
  return "\n".join(lines)


def run(checkpoint: str | None, images: Sequence[str], model_spec: str | None = None,
        verbose: bool = False) -> int:
  """The command: prints the predictions and returns 0, or prints one `error:` line for a user
  error and returns errors.EXIT_USER_ERROR (`verbose`: raises it instead)."""
  try:
    if not checkpoint:
      raise errors.UserError("--checkpoint: required (a weights file, hf-hub id or directory)")
    if not images:
      raise errors.UserError("no images: python -m swinv2_jax.predict --checkpoint=... IMAGE...")
    results = predict(checkpoint, images, model_spec)
  except Exception as e:  # pylint: disable=broad-except
    if verbose or not errors.is_user_error(e):
      raise
    errors.report(e)
    return errors.EXIT_USER_ERROR
  print(format_predictions(images, results))
  return 0


def _define_flags():
  """Defined for the command only: importing this module (tests) adds no absl flags."""
  flags.DEFINE_string(
      "checkpoint", None, "Weights: a .safetensors/.pth file, hf-hub:<owner>/<name>, a "
      "parameter directory or a fine-tune checkpoint (WORKDIR/finetune/checkpoints/STEP).")
  flags.DEFINE_string(
      "model", None, "A preset name, a config file (FILE.py[:ARG]) or a run's config.json; "
      "default: what the checkpoint says (model.json, its workdir's config.json, a timm name).")
  flags.DEFINE_bool("verbose", False, "Show the traceback of a user error.")


def main(argv) -> int:
  logs.quiet_other_libraries()
  f = flags.FLAGS
  return run(f.checkpoint, list(argv[1:]), f.model, f.verbose)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
