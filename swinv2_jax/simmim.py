"""SimMIM masked-image-modelling pretraining for Swin V2 (docs/design.md, "The recipes and
their sources"; official `models/simmim.py` and `data/data_simmim_pt.py`).

The encoder is a SwinTransformerV2 without head; masked tokens are replaced by a learnt mask
token after the patch embedding; a 1x1 conv + pixel shuffle decodes the last level back to
pixels; the loss is L1 on masked pixels, optionally against locally normalised targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swinv2_jax.models import layers
from swinv2_jax.models.swinv2 import SwinTransformerV2


class SimMIM(nnx.Module):
  """encoder (no head) + mask_token (1, 1, 1, C) + decoder (1x1 conv to stride^2 * 3)."""

  def __init__(self, encoder: SwinTransformerV2, *, rngs: nnx.Rngs | int = 0):
    if isinstance(rngs, int):
      rngs = nnx.Rngs(params=rngs)
    if encoder.head is not None:
      raise ValueError("the SimMIM encoder must be built with num_classes=0")
    self.encoder = encoder
    embed_dim = encoder.patch_embed.norm.scale.shape[-1]
    self.stride = encoder.patch_size * 2**(len(encoder.levels) - 1)
    self.mask_token = nnx.Param(layers.dense_init(rngs.params(), (1, 1, 1, embed_dim)))
    # A 1x1 conv with torch's default Conv2d init, as the official `SimMIM.decoder`.
    self.decoder = layers.conv(encoder.num_features, self.stride**2 * 3, 1, dtype=jnp.float32,
                               rngs=rngs)

  def __call__(self, images, token_mask, *, rng=None):
    """Reconstructed images (B, H, W, 3) in float32 from images with masked tokens."""
    maps = self.encoder.level_features(images, rng=rng, token_mask=token_mask,
                                       mask_token=self.mask_token[...])
    z = self.encoder.norm(maps[-1]).astype(jnp.float32)
    return pixel_shuffle(self.decoder(z), self.stride)


def pixel_shuffle(x, r: int):
  """torch.nn.PixelShuffle in NHWC: channel c*r*r + i*r + j -> pixel (h*r + i, w*r + j, c)."""
  b, h, w, c = x.shape
  out_c = c // (r * r)
  x = x.reshape(b, h, w, out_c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, out_c)


def _valid_counts(size: int, window: int) -> np.ndarray:
  """Pixels of a centred window that fall inside an axis of `size` (the padding not counted)."""
  index = np.arange(size)
  half = window // 2
  return (np.minimum(index + half, size - 1) - np.maximum(index - half, 0) + 1).astype(np.float32)


def normalize_targets(images, window: int = 47):
  """Per-pixel normalisation by the mean and unbiased variance of a window x window
  neighbourhood (stride 1, padding not counted), as the official SwinV2 SimMIM configs."""
  mean, std = local_statistics(images, window)
  return (images.astype(jnp.float32) - mean) / std


def local_statistics(images, window: int = 47):
  """(mean, sqrt(unbiased variance + 1e-6)) of each pixel's window x window neighbourhood:
  what `normalize_targets` divides by, and what turns a reconstruction back into pixels.

  The window sum is separable: one pass along H, one along W (2 x 47 adds per pixel, not
  47^2); the count of valid pixels is the outer product of the per-axis counts, built from
  O(H + W) numbers rather than folded from a reduce-window of ones by the compiler.
  """
  if window % 2 != 1:
    raise ValueError(f"the target normalisation window must be odd, got {window}")
  pad = window // 2

  def window_sum(v):
    for axis in (1, 2):
      dims = [1, 1, 1, 1]
      dims[axis] = window
      padding = [(0, 0)] * 4
      padding[axis] = (pad, pad)
      v = jax.lax.reduce_window(v, 0.0, jax.lax.add, dims, (1, 1, 1, 1), padding)
    return v

  x = images.astype(jnp.float32)
  _, h, w, _ = x.shape
  count = (jnp.asarray(_valid_counts(h, window))[:, None]
           * jnp.asarray(_valid_counts(w, window))[None, :])[None, :, :, None]
  mean = window_sum(x) / count
  var = (window_sum(x * x) / count - mean**2) * (count / (count - 1))
  return mean, jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6)


def reconstruction_loss(images, reconstruction, token_mask, patch_size: int,
                        norm_target_window: int = 0):
  """L1 over masked pixels: sum(|x - x_rec| * m) / (sum(m) + 1e-5) / channels."""
  target = normalize_targets(images, norm_target_window) if norm_target_window else images
  pixel_mask = jnp.repeat(jnp.repeat(token_mask, patch_size, axis=1), patch_size, axis=2)
  pixel_mask = pixel_mask[..., None].astype(jnp.float32)
  l1 = jnp.abs(target.astype(jnp.float32) - reconstruction)
  return jnp.sum(l1 * pixel_mask) / (jnp.sum(pixel_mask) + 1e-5) / images.shape[-1]
