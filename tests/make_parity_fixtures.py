"""Writes the Swin V2 parity fixtures under tests/fixtures/ from timm's PyTorch SwinTransformerV2.

Run with the reference environment (torch + timm, no jax):

    /work/venv-ref/bin/python tests/make_parity_fixtures.py [--official_dir=PATH]
    python tests/make_parity_fixtures.py --pth_only     # torch alone: the .pth from the .npz

For every small config below it builds timm's `SwinTransformerV2`, overwrites EVERY parameter
with random values (including the zero-initialised res-post-norm LayerNorms, logit_scale around
log(10) with some heads above the log(100) clamp, q/v biases and the CPB MLP: the released init
would hide errors in those), runs an eval-mode forward on a fixed random input and writes
`tests/fixtures/swinv2_<name>.npz` (see tests/fixtures/README.md for the contents). The stored
outputs are computed in float64 from the (float32) stored weights.

Then `swinv2_shift_clamp.pth` is written with `torch.save` from the official-layout state of
`swinv2_shift_clamp.npz`, wrapped as official checkpoints are (`{'model': state_dict, ...}`),
with a few tensors of other dtypes and strides beside it (`write_pth_fixture`): the torch-free
reader (swinv2_jax/weights/pth.py) is tested on it without torch. `--pth_only` writes only it.

`--official_dir` points at a local clone of microsoft/Swin-Transformer (NOT part of this
repository): the script then also builds the official `models/swin_transformer_v2.py` model for
each square config, loads the official-layout weights and reports its max |logit difference|
from timm. Nothing from that clone is written anywhere.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import torch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# Constructor arguments shared by this project's SwinTransformerV2 and timm's (same names).
CONFIGS = {
    # 4 stages with merging; feature maps 16, 8, 4, 2 with window 4: stages 0/1 shifted,
    # stage 2 clamps (4 <= 4: no shift), stage 3 clamps the window to 2. Also written in the
    # official and SimMIM key layouts.
    "shift_clamp": dict(img_size=64, embed_dim=4, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4],
                        window_size=4, num_classes=10, batch=2, layouts=["timm", "official",
                                                                          "simmim"]),
    # pretrained_window_sizes differing from the (clamped) window in every stage; odd depths
    # and a single-block stage (unstacked tail blocks in our model).
    "pretrained_window": dict(img_size=64, embed_dim=4, depths=[3, 2, 1, 2],
                              num_heads=[1, 2, 2, 4], window_size=8,
                              pretrained_window_sizes=[6, 12, 6, 3], num_classes=7, batch=1),
    # Rectangular input 64x128, window 4: maps (16,32), (8,16), (4,8), (2,4): in stage 2 only
    # the height clamps (no shift along h, shift 2 along w); stage 3 clamps to (2, 4).
    "rect": dict(img_size=[64, 128], embed_dim=4, depths=[2, 2, 2, 2], num_heads=[2, 2, 2, 4],
                 window_size=4, num_classes=5, batch=1),
    # One window per level, some rectangular: (8,8), (4,2), (2,2), (2,2) on maps 16, 8, 4, 2.
    "per_level_window": dict(img_size=64, embed_dim=4, depths=[2, 2, 2, 2],
                             num_heads=[2, 2, 2, 2], window_size=[[8, 8], [4, 2], [2, 2], [2, 2]],
                             num_classes=3, batch=1),
}


def timm_swinv2():
  """timm's model module (imported on use: --pth_only needs torch alone)."""
  import timm.models.swin_transformer_v2  # pylint: disable=g-import-not-at-top
  return timm.models.swin_transformer_v2


def model_kwargs(config: dict) -> dict:
  return {k: v for k, v in config.items() if k not in ("batch", "layouts")}


def build_timm(config: dict) -> torch.nn.Module:
  kwargs = model_kwargs(config)
  window = kwargs["window_size"]
  if isinstance(window, list):
    kwargs["window_size"] = tuple(tuple(w) if isinstance(w, list) else w for w in window)
  kwargs["img_size"] = (tuple(kwargs["img_size"]) if isinstance(kwargs["img_size"], list)
                        else kwargs["img_size"])
  return timm_swinv2().SwinTransformerV2(drop_path_rate=0.0, **kwargs).eval()


@torch.no_grad()
def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Overwrites every parameter with values that make each of them matter."""
  def normal(shape, std, mean=0.0):
    return torch.randn(shape, generator=gen) * std + mean

  for module in model.modules():
    if isinstance(module, torch.nn.LayerNorm):
      module.weight.copy_(normal(module.weight.shape, 0.5, 1.0))
      module.bias.copy_(normal(module.bias.shape, 0.2))
    elif isinstance(module, torch.nn.Linear):
      fan_in = module.weight.shape[1]
      module.weight.copy_(normal(module.weight.shape, 1.0 / math.sqrt(fan_in)))
      if module.bias is not None:
        module.bias.copy_(normal(module.bias.shape, 0.1))
    elif isinstance(module, torch.nn.Conv2d):
      fan_in = module.weight[0].numel()
      module.weight.copy_(normal(module.weight.shape, 1.0 / math.sqrt(fan_in)))
      module.bias.copy_(normal(module.bias.shape, 0.1))
    elif isinstance(module, timm_swinv2().WindowAttention):
      # log(10) = 2.30; the clamp is at log(100) = 4.61: draw from both sides of it.
      module.logit_scale.copy_(torch.rand(module.logit_scale.shape, generator=gen) * 4.5 + 0.8)
      module.q_bias.copy_(normal(module.q_bias.shape, 0.5))
      module.v_bias.copy_(normal(module.v_bias.shape, 0.5))
  for name, module in model.named_modules():
    if name.endswith("cpb_mlp"):
      # Inputs are in [-1, 1]: a wider first layer and O(1) sigmoid arguments after the second.
      module[0].weight.copy_(normal(module[0].weight.shape, 2.0))
      module[0].bias.copy_(normal(module[0].bias.shape, 0.5))
      module[2].weight.copy_(normal(module[2].weight.shape, 2.0 / math.sqrt(512)))


def to_official(timm_state: dict) -> dict:
  """timm names -> the official code's module names (models/swin_transformer_v2.py)."""
  out = {}
  for name, value in timm_state.items():
    name = re.sub(r"^layers\.(\d+)\.downsample\.",
                  lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
    name = name.replace("head.fc.", "head.")
    out[name] = value
  return out


def official_buffers(model: torch.nn.Module) -> dict:
  """The persistent buffers official checkpoints carry (official names): must be ignored."""
  out = {}
  for name, buf in model.named_buffers():
    if buf is None:
      continue
    if name.endswith(("relative_position_index", "relative_coords_table", "attn_mask")):
      out[name] = buf.numpy()
  return to_official(out)


def to_simmim(official_state: dict, buffers: dict, embed_dim: int, num_features: int,
              gen: torch.Generator) -> dict:
  """Official names -> an official SimMIM pretraining checkpoint (models/simmim.py):
  `encoder.` prefix, legacy `rpe_mlp`, no head, plus `encoder.mask_token` and the decoder
  `decoder.0` (1x1 conv to stride**2 * 3 channels, stride 32)."""
  out = {}
  for name, value in {**official_state, **buffers}.items():
    if name.startswith("head."):
      continue
    out["encoder." + name.replace(".cpb_mlp.", ".rpe_mlp.")] = value
  out["encoder.mask_token"] = (torch.randn((1, 1, embed_dim), generator=gen) * 0.02).numpy()
  stride = 32
  out["decoder.0.weight"] = (torch.randn((stride**2 * 3, num_features, 1, 1), generator=gen)
                             / math.sqrt(num_features)).numpy()
  out["decoder.0.bias"] = (torch.randn((stride**2 * 3,), generator=gen) * 0.1).numpy()
  return out


def load_official_module(official_dir: str):
  path = os.path.join(official_dir, "models", "swin_transformer_v2.py")
  spec = importlib.util.spec_from_file_location("official_swin_transformer_v2", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_official(official, config: dict, official_state: dict, x: torch.Tensor,
                   timm_logits: np.ndarray) -> float:
  kwargs = model_kwargs(config)
  pretrained = kwargs.pop("pretrained_window_sizes", [0] * len(kwargs["depths"]))
  model = official.SwinTransformerV2(drop_path_rate=0.0, pretrained_window_sizes=pretrained,
                                     **kwargs).eval()
  state = {k: torch.from_numpy(v) for k, v in official_state.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  buffers = ("relative_position_index", "relative_coords_table", "attn_mask")
  assert not unexpected, unexpected
  assert all(k.endswith(buffers) for k in missing), missing
  with torch.no_grad():
    logits = model(x).numpy()
  return float(np.abs(logits - timm_logits).max())


def pth_extras() -> dict:
  """Tensors beside the state dict in the .pth: every dtype the reader knows, views with strides
  and an offset into one shared storage, a 0-d and an empty tensor, an nn.Parameter. Values
  are exact in every dtype (multiples of 1/4 up to 5.75); tests/test_pth.py rebuilds them."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 4
  extras = {"float32": base, "transposed": base.t(), "sliced": base[1:3, 2:],
            "float64": base.double(), "float16": base.half(), "bfloat16": base.bfloat16(),
            "bool": base > 2, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
            "parameter": torch.nn.Parameter(base[0].clone(), requires_grad=True)}
  for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
    extras[str(dtype).split(".")[1]] = (base * 4).to(dtype)
  return extras


def write_pth_fixture(out_dir: str) -> str:
  """`swinv2_shift_clamp.pth` from the official-layout state of `swinv2_shift_clamp.npz`."""
  with np.load(os.path.join(out_dir, "swinv2_shift_clamp.npz")) as f:
    prefix = "state_official/"
    model = collections.OrderedDict(
        (k[len(prefix):], torch.from_numpy(f[k])) for k in f.files if k.startswith(prefix))
  model._metadata = collections.OrderedDict({"": {"version": 1}})  # as state_dict() sets it
  path = os.path.join(out_dir, "swinv2_shift_clamp.pth")
  # An official training checkpoint's outline (main.py save_checkpoint), minus the objects.
  torch.save({"model": model, "dtypes": pth_extras(), "epoch": 299, "max_accuracy": 81.25,
              "notes": ["official layout", ("shift_clamp", 4), None, True]}, path)
  print(f"{os.path.basename(path)}: {os.path.getsize(path) / 1e3:.0f} kB, {len(model)} tensors "
        f"in 'model', {len(pth_extras())} in 'dtypes'")
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_dir", default=None,
                      help="local clone of microsoft/Swin-Transformer for a one-off check")
  parser.add_argument("--out_dir", default=FIXTURE_DIR)
  parser.add_argument("--pth_only", action="store_true",
                      help="write only swinv2_shift_clamp.pth from the existing .npz (torch only)")
  args = parser.parse_args()
  if args.pth_only:
    write_pth_fixture(args.out_dir)
    return
  official = load_official_module(args.official_dir) if args.official_dir else None
  os.makedirs(args.out_dir, exist_ok=True)
  torch.set_num_threads(max(1, os.cpu_count() or 1))

  for index, (name, config) in enumerate(CONFIGS.items()):
    gen = torch.Generator().manual_seed(1000 + index)
    model = build_timm(config)
    randomise(model, gen)
    img = config["img_size"]
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn((config["batch"], 3, h, w), generator=gen)
    timm_state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    # Reference outputs in float64 from the float32 weights (exactly representable), so the
    # parity test measures our float32 error alone, not torch's as well.
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
      logits32 = model(x).numpy()
      logits = model64(x.double()).numpy()
      pooled = model64.forward_head(model64.forward_features(x.double()), pre_logits=True).numpy()
      features = model64.forward_intermediates(x.double(), intermediates_only=True)
    logits, pooled = logits.astype(np.float32), pooled.astype(np.float32)

    arrays = {
        "config": np.array(json.dumps(model_kwargs(config), sort_keys=True)),
        "input_nhwc": x.permute(0, 2, 3, 1).numpy(),
        "logits": logits,
        "pooled": pooled,
    }
    for i, f in enumerate(features):  # timm gives NCHW; stored NHWC like our model's maps
      arrays[f"features_{i}"] = f.permute(0, 2, 3, 1).numpy().astype(np.float32)
    layouts = config.get("layouts", ["timm"])
    official_state = to_official(timm_state)
    states = {"timm": timm_state}
    if "official" in layouts:
      states["official"] = {**official_state, **official_buffers(model)}
    if "simmim" in layouts:
      states["simmim"] = to_simmim(official_state, official_buffers(model), config["embed_dim"],
                                   model.num_features, gen)
    for layout, state in states.items():
      for key, value in state.items():
        arrays[f"state_{layout}/{key}"] = value
    path = os.path.join(args.out_dir, f"swinv2_{name}.npz")
    np.savez(path, **arrays)
    line = (f"{name}: {os.path.getsize(path) / 1e3:.0f} kB, layouts {list(states)}, "
            f"logits {logits.shape} |max| {np.abs(logits).max():.3f}, torch float32 vs float64 "
            f"max |dlogit| {np.abs(logits32 - logits).max():.3g}")
    if official is not None and isinstance(img, int) and isinstance(config["window_size"], int):
      diff = check_official(official, config, official_state, x, logits32)
      line += f", official-vs-timm max |dlogit| {diff:.3g}"
    print(line)
  write_pth_fixture(args.out_dir)


if __name__ == "__main__":
  sys.exit(main())
