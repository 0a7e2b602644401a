"""SimMIM's pieces against independent numpy statements of the official code
(microsoft/Swin-Transformer models/simmim.py): target normalisation, the decoder's pixel
shuffle, and the masked L1 loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swinv2_jax import simmim


def _reference_norm_targets(x: np.ndarray, window: int, *, ddof: int = 1,
                            count_padding: bool = False) -> np.ndarray:
  """Per pixel and channel, over the window x window neighbourhood clipped to the image (the
  padding is not counted): (x - mean) / sqrt(unbiased variance + 1e-6), in float64, one
  pixel at a time with numpy's own mean and var(ddof=1). `ddof=0` and `count_padding=True`
  state the two likely mistakes, to show the tolerance tells them apart."""
  x = x.astype(np.float64)
  _, height, width, _ = x.shape
  half = window // 2
  if count_padding:  # zeros around the image, counted in the mean and the variance
    x_pad = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
  out = np.empty_like(x)
  for i in range(height):
    rows = slice(max(0, i - half), min(height, i + half + 1))
    for j in range(width):
      if count_padding:
        patch = x_pad[:, i:i + window, j:j + window, :]
      else:
        patch = x[:, rows, max(0, j - half):min(width, j + half + 1), :]
      mean = patch.mean(axis=(1, 2))
      var = patch.var(axis=(1, 2), ddof=ddof)
      out[:, i, j, :] = (x[:, i, j, :] - mean) / np.sqrt(var + 1e-6)
  return out


def _images(seed=0, shape=(2, 64, 64, 3)):
  """Noise on a per-image, per-channel offset and a ramp: local means and variances change
  across the image, so a counted padding or a biased variance shows at every border."""
  rng = np.random.default_rng(seed)
  b, h, w, c = shape
  ramp = np.linspace(-2, 2, w)[None, None, :, None] * np.linspace(0.5, 1.5, h)[None, :, None,
                                                                               None]
  offset = rng.normal(size=(b, 1, 1, c)) * 2
  scale = rng.uniform(0.5, 2.0, size=(b, 1, 1, c))
  return (offset + ramp + scale * rng.normal(size=shape)).astype(np.float32)


def test_target_normalisation_with_window_47_matches_the_official_definition():
  """Window 47 on 64x64 (every real recipe's window; most windows are clipped by the border):
  catches a counted padding (count_include_pad=True), a biased (n) variance, a missing eps or
  an off-by-one window."""
  x = _images()
  got = np.asarray(simmim.normalize_targets(jnp.asarray(x), 47))
  # float32 sums of 2,209 squares against float64: measured 1.6e-5 at most.
  tol = dict(rtol=3e-5, atol=3e-5)
  np.testing.assert_allclose(got, _reference_norm_targets(x, 47), **tol)
  # The tolerance tells the official definition from its likely mistakes (the biased variance
  # differs by only n/(n-1), 2e-4 relative in the middle of the image).
  for mistake in (dict(ddof=0), dict(count_padding=True)):
    assert not np.allclose(got, _reference_norm_targets(x, 47, **mistake), **tol), mistake


def test_target_normalisation_small_window_and_constant_patch():
  """Window 5 on a non-square image, with a constant region: the variance there is 0 (clamped,
  never a NaN from float32 cancellation) and the target is 0."""
  x = _images(seed=1, shape=(1, 12, 20, 3))
  x[:, :6, :8, :] = 0.75
  got = np.asarray(simmim.normalize_targets(jnp.asarray(x), 5))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _reference_norm_targets(x, 5), rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(got[:, :4, :6, :])) < 1e-2  # windows wholly inside the constant area
  with pytest.raises(ValueError, match="must be odd"):
    simmim.normalize_targets(jnp.asarray(x), 4)


def _reference_pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
  """torch.nn.PixelShuffle, stated on NCHW as its documentation does, then moved to NHWC:
  out[b, c, h*r + i, w*r + j] = in[b, c*r*r + i*r + j, h, w]."""
  nchw = x.transpose(0, 3, 1, 2)
  b, channels, h, w = nchw.shape
  out_c = channels // (r * r)
  out = np.zeros((b, out_c, h * r, w * r), x.dtype)
  for c in range(out_c):
    for i in range(r):
      for j in range(r):
        out[:, c, i::r, j::r] = nchw[:, c * r * r + i * r + j]
  return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle_matches_torch_ordering(r):
  """Non-square maps, 3 output channels, every value distinct: any other channel order
  ((i, j, c), transposed i/j, ...) or a swapped height/width is caught."""
  x = np.arange(2 * 2 * 3 * 3 * r * r, dtype=np.float32).reshape(2, 2, 3, 3 * r * r)
  got = np.asarray(simmim.pixel_shuffle(jnp.asarray(x), r))
  assert got.shape == (2, 2 * r, 3 * r, 3)
  np.testing.assert_array_equal(got, _reference_pixel_shuffle(x, r))
  # One pixel written out by hand: output (h=1, w=2, c=2) at offset (i=1, j=0) of the block.
  assert got[1, 1 * r + 1, 2 * r + 0, 2] == x[1, 1, 2, 2 * r * r + 1 * r + 0]


def test_reconstruction_loss_on_a_known_masked_region():
  """Patch 2 on 8x12 images: tokens (row 1, columns 0..2) masked = pixel rows 2..3, columns
  0..5. The reconstruction is off by (0.3, -0.6, 0.9) per channel there and by 10 elsewhere;
  the loss is the mean |error| over masked pixels and channels: 0.6 (up to the 1e-5 of the
  official denominator). A transposed or misplaced mask upsampling would pick up the 10s."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  token_mask = np.zeros((2, 4, 6), np.int32)
  token_mask[0, 1, 0:3] = 1
  pixel_mask = np.zeros((2, 8, 12, 1), bool)
  pixel_mask[0, 2:4, 0:6] = True
  error = np.where(pixel_mask, np.array([0.3, -0.6, 0.9], np.float32), 10.0)
  loss = simmim.reconstruction_loss(jnp.asarray(images), jnp.asarray(images + error),
                                    jnp.asarray(token_mask), patch_size=2)
  n = 12  # masked pixels
  assert float(loss) == pytest.approx((0.3 + 0.6 + 0.9) * n / (n + 1e-5) / 3, rel=1e-6)

  # Masking a second image's region of error 2: (12 x 0.6 x 3 + 4 x 2 x 3) / 16 / 3.
  token_mask[1, 3, 5] = 1
  error[1, 6:8, 10:12] = 2.0
  loss = simmim.reconstruction_loss(jnp.asarray(images), jnp.asarray(images + error),
                                    jnp.asarray(token_mask), patch_size=2)
  assert float(loss) == pytest.approx((12 * 1.8 + 4 * 6.0) / (16 + 1e-5) / 3, rel=1e-6)


def test_reconstruction_loss_with_normalised_targets():
  """With norm_target_window the loss compares against the normalised image (not the raw
  one): a reconstruction equal to the reference targets has zero loss, the raw image not."""
  x = _images(seed=2, shape=(1, 16, 16, 3))
  mask = np.zeros((1, 4, 4), np.int32)
  mask[0, :2] = 1
  targets = _reference_norm_targets(x, 7).astype(np.float32)
  loss = simmim.reconstruction_loss(jnp.asarray(x), jnp.asarray(targets), jnp.asarray(mask),
                                    patch_size=4, norm_target_window=7)
  assert float(loss) < 1e-4
  raw = simmim.reconstruction_loss(jnp.asarray(x), jnp.asarray(x), jnp.asarray(mask),
                                   patch_size=4, norm_target_window=7)
  assert float(raw) > 0.1


def test_simmim_model_reconstructs_at_image_size_in_float32():
  """The decoder maps the last stage back to pixels (stride 2 x patch 4 for two stages), in
  float32 even under a bfloat16 encoder (abstractly: shapes and dtypes only)."""
  from flax import nnx
  from swinv2_jax.models import SwinTransformerV2
  model = nnx.eval_shape(lambda: simmim.SimMIM(SwinTransformerV2(
      img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=0,
      dtype=jnp.bfloat16)))
  assert model.stride == 8
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x, m: nnx.merge(graphdef, s)(x, m), state,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
                       jax.ShapeDtypeStruct((2, 8, 8), jnp.int32))
  assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32
