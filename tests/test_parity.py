"""Numerical parity with the PyTorch reference (timm's SwinTransformerV2, the official math).

The fixtures (tests/fixtures/*.npz, written by tests/make_parity_fixtures.py, see the README
there) hold randomised PyTorch weights in the timm, official and SimMIM key layouts, an input,
and the reference logits / pooled features / per-level maps computed in float64. No torch here.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import weights
from swinv2_jax.models import SwinTransformerV2
from swinv2_jax.models import windows as win

from parity_fixtures import FIXTURES, abstract_model, config, fixture, layouts, loaded, state

LOGIT_TOL = 1e-4  # max |logit difference| in float32
# The random fixtures are ill-conditioned on purpose (4-channel LayerNorms with random scales,
# logit scales up to the clamp at 100): torch's own float32 forward differs from its float64
# one by up to 1.1e-4 on the pooled features and 9e-5 (relative) on the level maps.
POOLED_TOL = 5e-4
FEATURE_RTOL = 3e-4  # per-level maps: max |difference| relative to the map's max |value|


@nnx.jit
def run(model, x):
  """(logits, pooled features, per-level maps) in one program."""
  maps = model.level_features(x)
  pooled = model.norm(maps[-1]).mean(axis=(1, 2))  # = model.features(x)
  return model(x), pooled, maps


@functools.lru_cache(maxsize=None)
def outputs(name: str, layout: str = "timm", attention_impl: str = "xla"):
  """Our float32 outputs for a fixture; models from a SimMIM state get the timm-loaded head
  (drop_head keeps it) so the compiled program is shared."""
  with jax.default_matmul_precision("highest"):
    if layout == "simmim":
      model = loaded(name, "timm")
      weights.load_pytorch_weights(model, {"model": state(name, "simmim")}, drop_head=True)
    else:
      model = loaded(name, layout, attention_impl=attention_impl)
    logits, pooled, maps = run(model, fixture(name)["input_nhwc"])
  return np.asarray(logits), np.asarray(pooled), [np.asarray(m) for m in maps]


# 'xla': every window through the einsums; 'auto' on CPU: unshifted windows through
# jax.nn.dot_product_attention(implementation='xla'), the call 'cudnn' makes on a GPU.
ATTENTION_IMPLS = ("xla", "auto")


@pytest.mark.parametrize("attention_impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_timm(name, attention_impl, record_property):
  logits, pooled, _ = outputs(name, attention_impl=attention_impl)
  diff = float(np.abs(logits - fixture(name)["logits"]).max())
  record_property("max_abs_logit_diff", diff)
  print(f"{name} ({attention_impl}): max |logit diff| {diff:.3g}")
  assert diff <= LOGIT_TOL
  assert float(np.abs(pooled - fixture(name)["pooled"]).max()) <= POOLED_TOL


@pytest.mark.parametrize("attention_impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("name", FIXTURES)
def test_level_features_match_timm(name, attention_impl):
  _, _, maps = outputs(name, attention_impl=attention_impl)
  for i, ours in enumerate(maps):
    ref = fixture(name)[f"features_{i}"]
    assert ours.shape == ref.shape, (i, ours.shape, ref.shape)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel <= FEATURE_RTOL, f"level {i}: relative error {rel:.3g}"


@pytest.mark.parametrize("name,layout", [(n, l) for n in FIXTURES for l in layouts(n)
                                         if l != "timm"])
def test_other_layouts_match(name, layout):
  """Official and SimMIM key layouts of the same weights give the same model and outputs."""
  logits, pooled, _ = outputs(name, layout)
  ref_logits, ref_pooled, _ = outputs(name, "timm")
  np.testing.assert_array_equal(pooled, ref_pooled)
  np.testing.assert_array_equal(logits, ref_logits)
  assert float(np.abs(pooled - fixture(name)["pooled"]).max()) <= POOLED_TOL
  if layout == "official":
    assert float(np.abs(logits - fixture(name)["logits"]).max()) <= LOGIT_TOL


def test_pretrained_window_sizes_change_the_output():
  name = "pretrained_window"
  cfg = config(name)
  assert any(p != 0 for p in cfg["pretrained_window_sizes"])
  # The position tables differ...
  windows = [w for w in SwinTransformerV2._level_windows(cfg["window_size"], 4)]
  feats = win.level_feature_sizes(win.to_pair(cfg["img_size"]), 4, 4)
  for (size, window, pretrained) in zip(feats, windows, cfg["pretrained_window_sizes"]):
    clamped, _ = win.clamp_window(size, window, (0, 0))
    if pretrained != clamped[0]:
      assert not np.allclose(win.relative_coords_table(clamped, (pretrained,) * 2),
                             win.relative_coords_table(clamped, (0, 0)))
  # ...and so does the output, with the same weights.
  logits, _, _ = outputs(name)
  with jax.default_matmul_precision("highest"):
    model = loaded(name, pretrained_window_sizes=0)
    other, _, _ = run(model, fixture(name)["input_nhwc"])
  assert float(np.abs(np.asarray(other) - logits).max()) > 1e-2


def test_image_size_off_the_grid_lists_working_sizes():
  cfg = config("shift_clamp")  # patch 4, window 4, 4 levels: 64 works, 72 does not
  with pytest.raises(ValueError, match="sizes that work") as info:
    abstract_model(cfg, img_size=72)
  message = str(info.value)
  listed = [int(s) for s in message.rsplit("[", 1)[1].rstrip("]").split(",")]
  assert 64 in listed and 72 not in listed
  for size in (min(listed), max(listed)):
    abstract_model(cfg, img_size=size)  # the suggestions build
