"""Compute dtypes: a bfloat16 forward stays close to the float32 one of the same parameters and
returns float32 logits; float16 (no loss scaling here) is refused by the config check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import load_config
from swinv2_jax import config as config_lib
from swinv2_jax import trainer as trainer_lib


def _tiny_config(dtype: str):
  """The digits recipe with two model levels (32 px, windows 4): compiles in about a second."""
  c = load_config("digits.py", "tiny")
  c.model.embed_dim, c.model.depths, c.model.num_heads = 32, (2, 2), (1, 2)
  c.finetune.pretrained_window_sizes = 4
  c.model.dtype = dtype
  config_lib.validate(c)
  return c


def _forward(config, params, images):
  model = nnx.eval_shape(lambda: trainer_lib.build_classifier(config, "eval", 10))
  model.eval()
  graphdef = nnx.split(model)[0]
  return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images)


def test_bfloat16_forward_is_close_to_float32_and_returns_float32_logits():
  """The same parameters (float32 in both: only the compute dtype changes), randomised so that
  no block is the identity (the post-norms start at zero), on 4 digits-sized images.

  Tolerance: RMS(bf16 - f32) <= 3% of RMS(f32 logits). bfloat16 keeps 8 significant bits (a
  rounding error of up to 0.4% per operation); through 4 blocks and a patch merging it measured
  0.35%, so 3% leaves room for other platforms' matmul accumulation and still fails a broken
  bf16 forward (an overflow, a NaN, a mask or bias rounded away). At this size it does not
  single out one float32 island computed in bf16 (a bf16 LayerNorm measured 0.38%): the
  LayerNorm test below does that for the norms. The difference must not be zero either: then
  bfloat16 would not be in use at all.
  """
  f32, bf16 = _tiny_config("float32"), _tiny_config("bfloat16")
  init = jax.jit(lambda: trainer_lib.split_params(
      trainer_lib.build_classifier(f32, "eval", 10))[1])
  params = init()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)).astype(np.float32))

  want = _forward(f32, params, images)
  got = _forward(bf16, params, images)
  assert want.dtype == got.dtype == jnp.float32
  want, got = np.asarray(want), np.asarray(got)
  rms = lambda a: float(np.sqrt(np.mean(np.square(a))))
  assert rms(want) > 0.5  # logits of a real scale: the relative bound means something
  assert 1e-4 * rms(want) < rms(got - want) <= 0.03 * rms(want), (rms(got - want), rms(want))

  # The blocks really compute in bfloat16 (the level outputs), while the logits are float32.
  graphdef = nnx.split(nnx.eval_shape(lambda: trainer_lib.build_classifier(bf16, "eval", 10)))[0]
  maps = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p).level_features(x), params, images)
  assert all(m.dtype == jnp.bfloat16 for m in maps)


def test_layer_norm_of_bfloat16_activations_is_computed_in_float32():
  """Residual streams carry large offsets; a LayerNorm whose mean and variance were computed in
  bfloat16 (a sum of 96 values near 64 rounds in steps of 32) would be off by ~0.3. Computed in
  float32, the output equals the float64 normalisation of the same bf16 inputs up to the final
  rounding to bf16 (0.4% of values up to ~3)."""
  from swinv2_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray((64 + rng.normal(size=(8, 96))).astype(np.float32)).astype(jnp.bfloat16)
  got = layers.LayerNorm(96, dtype=jnp.bfloat16)(x)
  assert got.dtype == jnp.bfloat16
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
  want = (x64 - mean) / np.sqrt(var + layers.LAYER_NORM_EPS)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)


def test_float16_is_refused_with_the_fix():
  """float16 without loss scaling underflows gradients and overflows Swin V2's attention; the
  config check must refuse it in one line naming the key and bfloat16 as the fix."""
  config = load_config("digits.py", "tiny")
  config.model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert message.startswith("config.model.dtype: 'float16' needs loss scaling")
  assert "use 'bfloat16'" in message and "\n" not in message
  for dtype in config_lib.DTYPES:  # what is offered instead validates
    config.model.dtype = dtype
    config_lib.validate(config)
  assert "float16" not in config_lib.DTYPES
