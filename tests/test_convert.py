"""swinv2_jax.weights: layouts, error handling, SimMIM, the H/G extra norm, safetensors/pth,
parameter directories and the CLI (the torch-free .pth reader: test_pth.py; hf-hub ids:
test_hub.py).

Models are built abstractly (nnx.eval_shape) and filled from checkpoints, so no random init
has to be compiled; the only forward pass is the tiny CLI model's.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import weights
from swinv2_jax.models import SwinTransformerV2

from parity_fixtures import abstract_model, config, loaded, state

NAME = "shift_clamp"  # 4 levels, all three layouts
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny 2-level model for the CLI (its forward compiles fast); built from a preset + overrides.
CLI_PRESET = "swinv2_tiny_window8_256"
CLI_OVERRIDES = dict(img_size=32, embed_dim=4, depths=[2, 1], num_heads=[1, 2], window_size=4,
                     num_classes=3, drop_path_rate=0.0)
# H/G's extra LayerNorm every 6 blocks, on a small model: two groups of 6 blocks in level 2.
EXTRA_NORM_ARGS = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16,
                       depths=(2, 2, 12, 2), num_heads=(1, 2, 4, 8), num_classes=3,
                       extra_norm_period=6, drop_path_rate=0.0)


def abstract(**overrides):
  return abstract_model(config(NAME), **overrides)


def randomized(model, seed=0):
  """`model` (abstract or not) with every parameter drawn at random, in place."""
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32) for leaf in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a: dict, b: dict, skip=("head.",)):
  keys = [k for k in a if not k.startswith(skip)]
  assert sorted(keys) == sorted(k for k in b if not k.startswith(skip))
  for k in keys:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class SimMIMStandIn(nnx.Module):
  """The structure swinv2_jax.simmim.SimMIM is to have: encoder, mask_token, 1x1 decoder."""

  def __init__(self, encoder_kwargs: dict, rngs: nnx.Rngs):
    self.encoder = SwinTransformerV2(**{**encoder_kwargs, "num_classes": 0})
    c0 = encoder_kwargs["embed_dim"]
    stride = 4 * 2**(len(encoder_kwargs["depths"]) - 1)
    self.mask_token = nnx.Param(jnp.zeros((1, 1, 1, c0)))
    self.decoder = nnx.Conv(self.encoder.num_features, stride**2 * 3, kernel_size=(1, 1),
                            rngs=rngs)


def test_layout_detection():
  assert weights.detect_layout(state(NAME, "timm")) == "timm"
  assert weights.detect_layout(state(NAME, "official")) == "official"
  assert weights.detect_layout(state(NAME, "simmim")) == "simmim"


def test_all_layouts_give_the_same_parameters():
  reference = params(loaded(NAME, "timm"))
  official = params(loaded(NAME, "official"))
  assert_same_params(reference, official, skip=())
  simmim = params(weights.load_pytorch_weights(abstract(num_classes=0),
                                               {"model": state(NAME, "simmim")}))
  assert_same_params(reference, simmim)
  # Spot checks of the conventions: Linear (out,in)->(in,out), Conv OIHW->HWIO, scale.
  timm = state(NAME, "timm")
  np.testing.assert_array_equal(reference["patch_embed.proj.kernel"],
                                timm["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(reference["head.kernel"], timm["head.fc.weight"].T)
  np.testing.assert_array_equal(reference["levels.0.downsample.reduction.kernel"],
                                timm["layers.1.downsample.reduction.weight"].T)
  np.testing.assert_array_equal(reference["levels.2.groups.blocks.1.norm1.scale"][0],
                                timm["layers.2.blocks.1.norm1.weight"])


def test_export_round_trip():
  model = loaded(NAME, "timm")
  for layout in ("official", "timm"):
    exported = weights.to_pytorch_state_dict(model, layout)
    expected = {k: v for k, v in state(NAME, layout).items() if not weights.is_buffer(k)}
    assert sorted(exported) == sorted(expected)
    for k in expected:
      np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)


def test_extra_norm_round_trip_and_names():
  """H/G's extra LayerNorm (our `groups.extra_norm`, stacked over the groups) is timm
  swinv2_cr's `norm3` of each group's last block, in both layouts, and is really read."""
  build = lambda: nnx.eval_shape(lambda: SwinTransformerV2(**EXTRA_NORM_ARGS))
  source = randomized(build())
  ours = params(source)
  extra_scale = ours["levels.2.groups.extra_norm.scale"]  # (2 groups, 64)
  assert extra_scale.shape == (2, 64)
  assert not any("extra_norm" in k for k in ours if not k.startswith("levels.2."))
  for layout in ("official", "timm"):
    exported = weights.to_pytorch_state_dict(source, layout)
    # Level 2 has 12 blocks in groups of 6: blocks 5 and 11 carry it; levels of 2 blocks none.
    assert {k for k in exported if ".norm3." in k} == {
        f"layers.2.blocks.{k}.norm3.{leaf}" for k in (5, 11) for leaf in ("weight", "bias")}
    for g, k in enumerate((5, 11)):
      np.testing.assert_array_equal(exported[f"layers.2.blocks.{k}.norm3.weight"], extra_scale[g])
      np.testing.assert_array_equal(exported[f"layers.2.blocks.{k}.norm3.bias"],
                                    ours["levels.2.groups.extra_norm.bias"][g])
    assert weights.detect_layout(exported) == layout
    assert_same_params(ours, params(weights.load_pytorch_weights(build(), exported)), skip=())

  # A changed norm3 in the checkpoint changes exactly that group's parameter.
  perturbed = dict(exported)
  perturbed["layers.2.blocks.5.norm3.weight"] = exported["layers.2.blocks.5.norm3.weight"] + 1
  got = params(weights.load_pytorch_weights(build(), perturbed))
  np.testing.assert_array_equal(got["levels.2.groups.extra_norm.scale"][0], extra_scale[0] + 1)
  np.testing.assert_array_equal(got["levels.2.groups.extra_norm.scale"][1], extra_scale[1])
  # A checkpoint without it (official / timm SwinV2) does not load silently.
  del perturbed["layers.2.blocks.11.norm3.bias"]
  with pytest.raises(ValueError, match=r"missing.*layers\.2\.blocks\.11\.norm3\.bias"):
    weights.load_pytorch_weights(build(), perturbed)


def test_missing_key():
  ckpt = dict(state(NAME, "timm"))
  del ckpt["layers.2.blocks.1.attn.q_bias"]
  with pytest.raises(ValueError, match=r"missing.*layers\.2\.blocks\.1\.attn\.q_bias"):
    weights.load_pytorch_weights(abstract(), ckpt)


def test_unexpected_key():
  ckpt = dict(state(NAME, "timm"), **{"layers.0.blocks.0.attn.bogus": np.zeros(3),
                                      "absolute_pos_embed": np.zeros((1, 4, 4))})
  with pytest.raises(ValueError, match="unexpected") as info:
    weights.load_pytorch_weights(abstract(), ckpt)
  assert "layers.0.blocks.0.attn.bogus" in str(info.value)
  assert "absolute_pos_embed" in str(info.value)


def test_wrong_shape():
  ckpt = dict(state(NAME, "official"))
  ckpt["layers.1.blocks.0.attn.qkv.weight"] = np.zeros((24, 7), np.float32)
  with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.attn\.qkv\.weight.*\(24, 7\)"
                                       r".*\(8, 24\)"):
    weights.load_pytorch_weights(abstract(), ckpt)


def test_nothing_changes_when_loading_fails():
  model = loaded(NAME, "timm")
  before = params(model)
  ckpt = dict(state(NAME, "timm"))
  ckpt["norm.weight"] = ckpt["norm.weight"] + 1
  del ckpt["norm.bias"]
  with pytest.raises(ValueError):
    weights.load_pytorch_weights(model, ckpt)
  assert_same_params(before, params(model), skip=())


def test_wrong_head_size_suggests_drop_head():
  with pytest.raises(ValueError, match=r"10 classes.*num_classes=3.*drop_head=True"):
    weights.load_pytorch_weights(abstract(num_classes=3), state(NAME, "timm"))


def test_drop_head_keeps_the_models_head():
  model = loaded(NAME, "timm")  # a concrete model whose head we know
  head = {k: v for k, v in params(model).items() if k.startswith("head.")}
  ckpt = {k: (v + 1 if k != "head.fc.weight" else v[:4]) for k, v in state(NAME, "timm").items()
          if not weights.is_buffer(k)}
  weights.load_pytorch_weights(model, ckpt, drop_head=True)
  after = params(model)
  for k, v in head.items():
    np.testing.assert_array_equal(after[k], v)
  np.testing.assert_array_equal(after["norm.scale"], state(NAME, "timm")["norm.weight"] + 1)


def test_drop_head_on_an_abstract_model_is_refused():
  with pytest.raises(ValueError, match="abstract.*head"):
    weights.load_pytorch_weights(abstract(), state(NAME, "timm"), drop_head=True)


def test_headless_model_and_a_head_in_the_checkpoint():
  with pytest.raises(ValueError, match="drop_head=True to discard"):
    weights.load_pytorch_weights(abstract(num_classes=0), state(NAME, "timm"))
  model = weights.load_pytorch_weights(abstract(num_classes=0), state(NAME, "timm"),
                                       drop_head=True)
  assert_same_params(params(loaded(NAME, "timm")), params(model))


def test_simmim_into_classifier(caplog):
  with pytest.raises(ValueError, match="no classifier head.*drop_head=True"):
    weights.load_pytorch_weights(abstract(), {"model": state(NAME, "simmim")})
  model = loaded(NAME, "timm")
  caplog.set_level(logging.INFO)
  weights.load_pytorch_weights(model, {"model": state(NAME, "simmim")}, drop_head=True)
  assert "mask_token" in caplog.text and "decoder.0.weight" in caplog.text


def test_simmim_into_simmim_module():
  kwargs = {**config(NAME), "drop_path_rate": 0.0}
  model = nnx.eval_shape(lambda: SimMIMStandIn(kwargs, nnx.Rngs(0)))
  ckpt = state(NAME, "simmim")
  weights.load_pytorch_weights(model, {"model": ckpt})
  got = params(model)
  np.testing.assert_array_equal(got["mask_token"], ckpt["encoder.mask_token"][None])
  np.testing.assert_array_equal(got["decoder.kernel"],
                                ckpt["decoder.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["decoder.bias"], ckpt["decoder.0.bias"])
  encoder = {k[len("encoder."):]: v for k, v in got.items() if k.startswith("encoder.")}
  assert_same_params(params(loaded(NAME, "timm")), encoder)
  exported = weights.to_pytorch_state_dict(model)
  expected = {k.replace("rpe_mlp", "cpb_mlp"): v for k, v in ckpt.items()
              if not weights.is_buffer(k)}
  assert sorted(exported) == sorted(expected)
  # A classifier checkpoint lacks mask_token and decoder.
  with pytest.raises(ValueError, match="missing.*mask_token"):
    weights.load_pytorch_weights(model, state(NAME, "official"), drop_head=True)


def test_safetensors_round_trip(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / "weights.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state(NAME, "official").items()}, path)
  assert_same_params(params(loaded(NAME, "timm")),
                     params(weights.load_pytorch_weights(abstract(), path)), skip=())


def test_pth(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "weights.pth")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in
                        state(NAME, "simmim").items()}, "epoch": 3}, path)
  model = weights.load_pytorch_weights(abstract(num_classes=0), path)
  assert_same_params(params(loaded(NAME, "timm")), params(model))


def test_converted_and_pretrain_encoder_directories_share_one_format(tmp_path):
  """The converter's output and train.py's `pretrain/encoder` (`checkpointing.save_tree` of
  the pure parameter dict) are read by the same code, either way round."""
  model = loaded(NAME, "timm")
  encoder_dir = str(tmp_path / "encoder")
  checkpointing.save_tree(encoder_dir, nnx.to_pure_dict(nnx.state(model)))  # as train.py
  restored = weights.load_params(encoder_dir, abstract())
  assert_same_params(params(model), params(restored), skip=())

  converted_dir = weights.save_params(str(tmp_path / "converted"), model, {"model": "x"})
  assert converted_dir == str(tmp_path / "converted")
  assert weights.load_model_config(converted_dir) == {"model": "x"}
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  abstract_tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  loaded_tree = checkpointing.load_tree(converted_dir, abstract_tree)  # as train.py
  for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded_tree)):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
  for not_a_checkpoint in (tmp_path / "absent", tmp_path):
    with pytest.raises(FileNotFoundError, match="no orbax parameter checkpoint"):
      weights.load_params(str(not_a_checkpoint), abstract())


@nnx.jit
def _forward(model, x):
  return model(x)


def test_cli_end_to_end(tmp_path):
  from safetensors.numpy import save_file
  from swinv2_jax import models
  # A random tiny model, exported in timm layout.
  source = randomized(nnx.eval_shape(lambda: models.create(CLI_PRESET, **CLI_OVERRIDES)))
  ckpt = str(tmp_path / "tiny.safetensors")
  save_file(weights.to_pytorch_state_dict(source, "timm"), ckpt)

  out = tmp_path / "converted"
  overrides = {k: v for k, v in CLI_OVERRIDES.items() if k not in ("num_classes", "img_size")}
  result = subprocess.run(
      [sys.executable, "-m", "swinv2_jax.weights", f"--checkpoint={ckpt}",
       f"--model={CLI_PRESET}", f"--output={out}", "--num_classes=3", "--img_size=32",
       f"--overrides={json.dumps(overrides)}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "parameters:" in result.stdout
  assert json.loads((out / "model.json").read_text())["model"] == CLI_PRESET

  restored = weights.restore_model(str(out))
  assert_same_params(params(source), params(restored), skip=())
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  source.eval()
  restored.eval()
  np.testing.assert_array_equal(np.asarray(_forward(source, x)),
                                np.asarray(_forward(restored, x)))

  # A parameter directory onto a model with another head: refused as a PyTorch file is, unless
  # drop_head, which keeps the model's own head; other shapes name each mismatch.
  build = lambda **kw: models.create(CLI_PRESET, **{**CLI_OVERRIDES, **kw})
  with pytest.raises(weights.HeadMismatchError, match=r"head has 3 classes.*num_classes=5.*"
                     r"drop_head=True"):
    weights.load_params(str(out), nnx.eval_shape(lambda: build(num_classes=5)))
  other = build(num_classes=5)
  head = np.asarray(other.head.kernel.get_value())
  weights.load_params(str(out), other, drop_head=True)
  np.testing.assert_array_equal(np.asarray(other.head.kernel.get_value()), head)
  assert_same_params(params(source), params(other))
  with pytest.raises(ValueError, match=r"patch_embed\.proj\.kernel.*\(4, 4, 3, 4\).*"
                     r"\(4, 4, 3, 8\)"):
    weights.load_params(str(out), nnx.eval_shape(lambda: build(embed_dim=8)))
