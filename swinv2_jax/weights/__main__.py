"""CLI: a PyTorch Swin V2 checkpoint -> a parameter directory (format: `weights.export`).

    python -m swinv2_jax.weights --checkpoint=IN --model=NAME --output=DIR
    python -m swinv2_jax.weights --checkpoint=hf-hub:timm/<name> --model=NAME --output=DIR

`--num_classes`, `--img_size`, `--window_size`, `--pretrained_window_sizes` and `--overrides`
change the preset; `model.json` records the result so `weights.restore_model(DIR)` rebuilds it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jax
from absl import app
from absl import flags
from flax import nnx

from swinv2_jax import logs
from swinv2_jax import models
from swinv2_jax.weights.export import save_params
from swinv2_jax.weights.mapping import load_pytorch_weights


def _parse_ints(text: str | None):
  """'16' -> 16; '64,128' -> [64, 128]; None/'' -> None."""
  if text is None or text == "":
    return None
  values = [int(v) for v in re.split(r"[,x ]+", text.strip()) if v]
  return values[0] if len(values) == 1 else values


def _define_flags():
  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint: .safetensors, .pth, .pt or .bin "
                      "(no torch needed), or hf-hub:<owner>/<name> (e.g. hf-hub:timm/"
                      "swinv2_tiny_window8_256.ms_in1k).")
  flags.DEFINE_string("model", None, "Model preset name (swinv2_jax.models.list_models()).")
  flags.DEFINE_string("output", None, "Output directory for the orbax checkpoint.")
  flags.DEFINE_integer("num_classes", None, "Classes of the head (0: no head). Preset default "
                       "if unset.")
  flags.DEFINE_string("img_size", None, "Input size: '256' or 'H,W'.")
  flags.DEFINE_string("window_size", None, "Window: '16', 'h,w', or one per level "
                      "'32,32,32,48'.")
  flags.DEFINE_string("pretrained_window_sizes", None, "Per-level pretraining windows, e.g. "
                      "'12,12,12,6'.")
  flags.DEFINE_string("overrides", None, "Further constructor arguments as a JSON object, e.g. "
                      "'{\"embed_dim\": 32}'.")
  flags.DEFINE_bool("drop_head", False, "Keep a freshly initialised head instead of the "
                    "checkpoint's.")
  flags.mark_flags_as_required(["checkpoint", "model", "output"])


def cli_model_config(flag_values) -> dict:
  """{"model": preset, "overrides": constructor arguments} from the flags (`model.json`)."""
  overrides: dict[str, Any] = {}
  if flag_values.overrides:
    overrides.update(json.loads(flag_values.overrides))
  if flag_values.num_classes is not None:
    overrides["num_classes"] = flag_values.num_classes
  for name in ("img_size", "window_size", "pretrained_window_sizes"):
    value = _parse_ints(getattr(flag_values, name))
    if value is not None:
      overrides[name] = value
  return {"model": flag_values.model, "overrides": overrides}


def main(argv):
  del argv
  logs.quiet_other_libraries()  # orbax logs ~35 lines per save; --verbosity=0 shows them
  flag_values = flags.FLAGS
  config = cli_model_config(flag_values)
  build = lambda: models.create(config["model"], **config["overrides"])
  # Every parameter comes from the checkpoint unless the head is dropped: skip the random init.
  model = build() if flag_values.drop_head else nnx.eval_shape(build)
  load_pytorch_weights(model, flag_values.checkpoint, drop_head=flag_values.drop_head)
  path = save_params(flag_values.output, model, config)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"parameters: {count:,}")
  print(f"converted {flag_values.checkpoint} -> {path} ({config['model']}, "
        f"overrides {json.dumps(config['overrides'], sort_keys=True)}, {count / 1e6:.2f}M params, "
        f"img_size {model.img_size}, windows {list(model.level_windows)}, "
        f"num_classes {model.num_classes}{', head dropped' if flag_values.drop_head else ''})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
