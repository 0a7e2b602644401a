"""Initialisation as the official code: Dense layers and the convolutions.

The official `SwinTransformerV2._init_weights` re-initialises only nn.Linear and nn.LayerNorm, so
the patch-embedding conv and the SimMIM decoder conv keep PyTorch's default init: kernel and
bias uniform in +-1/sqrt(fan_in), i.e. a kernel std of 1/sqrt(3 * fan_in). Flax's default,
lecun_normal, would give a std of 1/sqrt(fan_in), which these tests must reject.
"""

import math

import numpy as np
from flax import nnx

from swinv2_jax.models import layers
from swinv2_jax.models.swinv2 import SwinTransformerV2
from swinv2_jax.simmim import SimMIM


def _check_torch_default_conv(conv, fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  kernel = np.asarray(conv.kernel[...])
  bias = np.asarray(conv.bias[...])
  # Uniform(-b, b) has std b / sqrt(3); lecun_normal's std b is far outside the 10% tolerance
  # (the sampling error of the estimate is about 1% at these sizes).
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.1)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound  # uniform fills its range
  assert np.abs(bias).max() <= bound
  assert np.abs(bias).max() > 0  # torch draws the bias too; it does not start at 0


def test_patch_embed_conv_uses_torch_default_init():
  embed = layers.PatchEmbed(4, 3, 64, dtype=np.float32, rngs=nnx.Rngs(params=0))
  assert embed.proj.kernel.shape == (4, 4, 3, 64)
  _check_torch_default_conv(embed.proj, fan_in=4 * 4 * 3)


def test_simmim_decoder_conv_uses_torch_default_init():
  encoder = SwinTransformerV2(img_size=32, patch_size=4, num_classes=0, embed_dim=16,
                              depths=(2, 2), num_heads=(1, 2), window_size=4, rngs=0)
  model = SimMIM(encoder, rngs=1)
  assert model.decoder.kernel.shape == (1, 1, 32, 8 * 8 * 3)
  _check_torch_default_conv(model.decoder, fan_in=32)


def test_dense_layers_use_an_untruncated_std_of_0_02():
  """timm's trunc_normal_(std=.02), which the official _init_weights calls, cuts at +-2 in
  absolute terms (+-100 sigma): the realised std is 0.02. A cut at +-2 sigma (flax's default)
  gives 0.0176, which the 2% tolerance rejects (the estimate's sampling error is ~0.3%)."""
  layer = layers.dense(256, 512, dtype=np.float32, rngs=nnx.Rngs(params=0))
  kernel = np.asarray(layer.kernel[...])
  np.testing.assert_allclose(kernel.std(), 0.02, rtol=0.02)
  assert np.abs(kernel).max() > 2 * 0.02  # nothing is cut at two sigma
  assert not np.any(np.asarray(layer.bias[...]))
