"""model.attention_impl: unshifted windows through jax.nn.dot_product_attention (the logit scale
folded into q, the position bias as a (1, heads, N, N) bias), shifted windows through the
einsums with the official -100 mask. On CPU 'auto' makes the same call with
implementation='xla' that 'cudnn' makes on a GPU; it must equal the einsums to 1e-5 in the
output and in every parameter's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swinv2_jax import config as config_lib
from swinv2_jax.models import layers

from test_models import _build, _loss_and_grads, _randomise

TOL = 1e-5


def _near_the_clamp(model, seed=7):
  """Logit scales drawn around the clamp at 100 (log 4.0 to 5.3), where cosine logits span
  +-100 and float32 rounding is amplified most."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
  leaves = [jax.random.uniform(next(keys), x.shape, minval=4.0, maxval=5.3)
            if "logit_scale" in jax.tree_util.keystr(path) else x for path, x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _variant(reference, **overrides):
  model = _build(**overrides)
  nnx.update(model, nnx.state(reference, nnx.Param))
  model.eval()
  return model


def _gradient_error(grads, ref_grads) -> float:
  """Largest |difference| of any parameter's gradient, relative to max(1, that leaf's max)."""
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  return max(float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
             for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))


X = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))


@pytest.fixture(scope="module")
def reference():
  """The einsum path ('xla'), every parameter randomised (logit scales around 10); its loss
  and gradients."""
  model = _randomise(_build())
  model.eval()
  return model, _loss_and_grads(model, X)


@pytest.mark.parametrize("chunks", [1, (4, 2, 1, 1)])
def test_fused_call_equals_einsums_forward_and_gradients(reference, chunks):
  model, (ref_loss, ref_grads) = reference
  fused = _variant(model, attention_impl="auto", attention_chunks=chunks)
  # Levels 0-1 (16x16 and 8x8 maps, window 4) have a plain and a shifted block; levels 2-3
  # fit one window, so neither of their blocks is shifted.
  taken = [(block.shift, block.attn.implementation)
           for level in fused.levels for block in level.groups.blocks]
  assert taken == [((0, 0), "xla"), ((2, 2), None)] * 2 + [((0, 0), "xla")] * 4
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(forward(fused, X), forward(model, X), rtol=0, atol=TOL)
  loss, grads = _loss_and_grads(fused, X)
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
  assert _gradient_error(grads, ref_grads) <= TOL


def test_fused_call_near_the_logit_scale_clamp_moves_no_more_than_reassociation():
  """At logit scales near 100 float32 rounding is amplified: there sequential attention, the
  same einsums summed in another order, already moves gradients by ~2e-5. The fused call
  must stay within twice that of the einsums."""
  model = _near_the_clamp(_randomise(_build()))
  model.eval()
  _, ref_grads = _loss_and_grads(model, X)
  _, chunked = _loss_and_grads(_variant(model, attention_chunks=(4, 2, 1, 1)), X)
  _, fused = _loss_and_grads(_variant(model, attention_impl="auto"), X)
  floor = _gradient_error(chunked, ref_grads)
  assert _gradient_error(fused, ref_grads) <= 2 * max(floor, TOL)


def test_cudnn_is_refused_where_it_cannot_run():
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU"):
    layers.fused_attention_implementation("cudnn", jnp.bfloat16, 32, (8, 8))
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    layers.fused_attention_implementation("flash", jnp.float32, 32, (8, 8))
  assert layers.fused_attention_implementation("auto", jnp.bfloat16, 32, (7, 7)) == "xla"
  assert layers.fused_attention_implementation("xla", jnp.bfloat16, 32, (8, 8)) is None


def test_config_key_is_checked_and_reaches_the_model():
  c = config_lib.base_config()
  c.model.attention_impl = "auto"
  config_lib.validate(c)
  assert config_lib.model_args(c, "finetune")["attention_impl"] == "auto"
  c.model.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match="config.model.attention_impl"):
    config_lib.validate(c)
  c.model.attention_impl = "cudnn"  # float32 compute: cuDNN flash attention has none
  with pytest.raises(config_lib.ConfigError, match="model.dtype='bfloat16'"):
    config_lib.validate(c)

