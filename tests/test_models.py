"""Model family: sizes, API, window geometry, and the scan/remat/sequential-attention paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import models
from swinv2_jax.models import complexity
from swinv2_jax.models import layers
from swinv2_jax.models import windows as win

TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
            window_size=4, num_classes=7, drop_path_rate=0.0)


@nnx.jit
def _forward(model, x, rng=None):
  return model(x, rng=rng)


def _build(**overrides):
  return models.SwinTransformerV2(**{**TINY, **overrides})


def _randomise(model, seed=0):
  """Randomises every parameter, zero-initialised norms included (zeros would hide errors)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


@pytest.mark.parametrize("name,expected", [
    ("swinv2_tiny_window8_256", 28_347_154),
    ("swinv2_small_window8_256", 49_728_418),
    ("swinv2_base_window16_256", 87_918_816),
    ("swinv2_large_window12to24_192to384", 196_739_932),
])
def test_parameter_counts_match_pytorch_reference(name, expected):
  assert complexity.count_params(name) == expected


def test_huge_and_giant_parameter_counts_match_paper():
  assert abs(complexity.count_params("swinv2_huge_window12_192") / 658e6 - 1) < 0.01
  assert abs(complexity.count_params("swinv2_giant_window40_640") / 3.0e9 - 1) < 0.01


def test_mac_counts_match_official_flops_column():
  assert round(complexity.count_macs("swinv2_tiny_window8_256") / 1e9, 1) == 5.9
  assert round(complexity.count_macs("swinv2_tiny_window16_256") / 1e9, 1) == 6.6
  assert round(complexity.count_macs("swinv2_base_window16_256") / 1e9, 1) == 21.8
  assert round(complexity.count_macs("swinv2_base_window12to24_192to384") / 1e9, 1) == 54.7


def test_registry_names_and_unknown_name():
  names = models.list_models()
  assert "swinv2_tiny_window8_256" in names and "swinv2_giant_window32_1536" in names
  with pytest.raises(ValueError, match="unknown model"):
    models.create("swinv2_enormous")


def test_forward_features_and_determinism():
  model = _randomise(_build(drop_path_rate=0.2))
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  maps = nnx.eval_shape(lambda m, x: m.level_features(x), model, x)
  assert [m.shape for m in maps] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
  assert nnx.eval_shape(lambda m, x: m.features(x), model, x).shape == (2, 128)
  train_a = _forward(model, x, jax.random.key(0))
  train_b = _forward(model, x, jax.random.key(1))
  assert not np.allclose(train_a, train_b), "stochastic depth should depend on the rng"
  model.eval()
  logits = _forward(model, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, _forward(model, x, jax.random.key(5)))


def test_zero_initialised_post_norms_make_blocks_identity():
  model = _build()
  model.eval()
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  embedded = model.patch_embed(x)
  blocks_out = nnx.jit(lambda level, x: level.run_blocks(x))(model.levels[0], embedded)
  np.testing.assert_allclose(blocks_out, embedded, atol=1e-6)


def test_window_clamping_per_axis():
  assert win.clamp_window((8, 8), (8, 8), (4, 4)) == ((8, 8), (0, 0))
  assert win.clamp_window((4, 16), (8, 8), (4, 4)) == ((4, 8), (0, 4))
  model = _build(img_size=(64, 128))
  blocks = model.levels[1].groups.blocks  # 8x16 map, window 4: shifts both axes
  assert (blocks[1].window, blocks[1].shift) == ((4, 4), (2, 2))
  blocks = model.levels[2].groups.blocks  # 4x8 map: height fits one window, so no shift on it
  assert (blocks[1].window, blocks[1].shift) == ((4, 4), (0, 2))
  last = model.levels[3].groups.blocks  # 2x4 map: both axes clamp, no shift
  assert (last[1].window, last[1].shift) == ((2, 4), (0, 0))
  model.eval()
  assert _forward(model, jnp.zeros((1, 64, 128, 3))).shape == (1, 7)


def test_shift_mask_regions():
  regions = win.shift_region_ids((8, 8), (4, 4), (2, 2))
  assert regions.shape == (4, 16) and regions.dtype == np.int8
  mask = np.asarray(win.shift_attention_mask(regions))
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any(), "the top-left window holds one region"
  assert set(np.unique(mask[3])) == {0.0, -100.0}
  # The bottom-right window holds four regions of 2x2 tokens: token 0 (region 0) and token 15
  # (region 8) are masked, tokens 0 and 1 (both region 0) are not.
  assert mask[3, 0, 15] == -100.0 and mask[3, 0, 1] == 0.0
  assert win.shift_region_ids((8, 8), (4, 4), (0, 0)) is None


def test_relative_position_index_matches_the_official_construction():
  wh, ww = 3, 4  # rectangular, so a swapped axis would show
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[..., 0] += wh - 1
  rel[..., 1] += ww - 1
  rel[..., 0] *= 2 * ww - 1
  np.testing.assert_array_equal(np.asarray(win.relative_position_index((wh, ww))), rel.sum(-1))


def test_input_size_that_does_not_fit_names_working_sizes():
  with pytest.raises(ValueError, match=r"sizes that work near it: \[.*64.*\]"):
    _build(img_size=72)
  model = _build()
  with pytest.raises(ValueError, match="img_size"):
    _forward(model, jnp.zeros((1, 32, 32, 3)))


def test_pretrained_window_sizes_change_the_position_bias():
  table_own = win.relative_coords_table((8, 8), (0, 0))
  table_pre = win.relative_coords_table((8, 8), (6, 6))
  # At the window edge |x| = 8 when normalised by the own window: log2(1 + 8) / log2(8).
  assert np.abs(table_own).max() == pytest.approx(np.log2(9) / 3)
  # Normalised by a smaller pretrained window (6), the edge lies beyond 8: it extrapolates.
  assert np.abs(table_pre).max() == pytest.approx(np.log2(1 + 7 / 5 * 8) / 3)


def test_odd_depth_uses_scanned_groups_plus_tail():
  model = _build(depths=(2, 2, 5, 2))
  level = model.levels[2]
  assert level.groups.blocks[0].attn.q_bias.shape == (2, 64) and len(level.tail.blocks) == 1
  model.eval()
  assert np.isfinite(_forward(model, jnp.ones((1, 64, 64, 3)))).all()


def test_extra_norm_every_six_blocks():
  model = _build(depths=(2, 2, 14, 2), extra_norm_period=6)
  level = model.levels[2]
  assert level.blocks_per_group == 6 and level.groups.extra_norm.scale.shape == (2, 64)
  assert len(level.tail.blocks) == 2 and level.tail.extra_norm is None
  assert model.levels[0].groups.extra_norm is None  # depth 2 < 6: no extra norm
  # 2 extra norms of 64 channels: exactly 256 parameters more than without them.
  plain = _build(depths=(2, 2, 14, 2))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(model) - count(plain) == 256


def _loss_and_grads(model, x):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_and_sequential_attention_keep_loss_and_gradients():
  x = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  reference = _randomise(_build())
  reference.eval()
  ref_loss, ref_grads = _loss_and_grads(reference, x)
  # Every remat policy and sequential attention (level 1: 4 pieces of 4 windows, level 2: 2).
  for overrides in (dict(remat="full"),
                    dict(remat=("dots", "none", "full", "dots_no_batch"),
                         attention_chunks=(4, 2, 1, 1))):
    variant = _build(**overrides)
    nnx.update(variant, nnx.state(reference, nnx.Param))
    variant.eval()
    loss, grads = _loss_and_grads(variant, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      # Only float32 reassociation may differ: ~1e-6 of the leaf's largest gradient.
      np.testing.assert_allclose(a, b, rtol=0, atol=5e-6 * max(1.0, float(np.abs(b).max())))


def test_attention_chunks_must_divide_windows():
  with pytest.raises(ValueError, match="attention_chunks=3"):
    _build(attention_chunks=(3, 1, 1, 1))


def _constant_sizes(stablehlo: str) -> list[int]:
  """Bytes of every constant in a lowered StableHLO module."""
  sizes = []
  for m in re.finditer(r"stablehlo\.constant dense<.*?> : tensor<([0-9x]*)([a-z]+[0-9]*)>",
                       stablehlo):
    dims, dtype = m.group(1), m.group(2)
    count = int(np.prod([int(d) for d in dims.strip("x").split("x")])) if dims else 1
    bits = 8 if dtype in ("i1", "pred") else int(re.sub(r"\D", "", dtype) or 8)
    sizes.append(count * max(bits, 8) // 8)
  return sizes


def test_no_large_constant_in_a_giant_1536_level_one_block():
  """SwinV2-G at 1536 px, level 1: a shifted 32x32-window block over a 384x384 map (144
  windows of 1024 tokens). The shift mask (576 MiB as a float32 constant) and the position
  index (4 MiB) are built in the graph, so no constant in the program is over 1 MiB."""
  block = nnx.eval_shape(lambda: layers.SwinV2Block(
      512, 16, (384, 384), (32, 32), (16, 16), (12, 12), attention_chunks=16,
      dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(block)
  x = jax.ShapeDtypeStruct((1, 384, 384, 512), jnp.bfloat16)
  text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
  sizes = _constant_sizes(text)
  assert sizes, "no constants found: the parser would miss a large one"
  assert max(sizes) <= 2**20, sorted(sizes)[-5:]
