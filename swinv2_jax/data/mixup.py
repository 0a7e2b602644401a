"""Mixup / CutMix on device, timm `Mixup` in batch mode (mode='batch', correct_lam=True).

One lambda per batch; example i is mixed with example B-1-i (the batch reversed); CutMix pastes a
box from the reversed batch and corrects lambda to the box area actually pasted (boxes clipped at
the border); targets are label-smoothed one-hots mixed with the same lambda.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, label_smoothing: float):
  """timm: off = smoothing / classes, on = 1 - smoothing + off (each row sums to 1)."""
  off = label_smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - label_smoothing) + off


def mixup_cutmix_params(key, image_hw, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
                        switch_prob: float):
  """(lam, use_cutmix, (y0, y1, x0, x1)): the batch's mixing weight and, for CutMix, its box.

  lam weighs the original batch; with CutMix it is 1 - box area / image area.
  """
  height, width = image_hw
  k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  elif mixup_alpha > 0 or cutmix_alpha > 0:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  else:
    raise ValueError("mixup_cutmix_params: mixup_alpha or cutmix_alpha must be > 0")
  # One beta draw whose alpha depends on the mode: a single sampler to compile (it is slow to).
  alpha = jnp.where(use_cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
  lam_mix = jax.random.beta(k_lam, alpha, alpha)
  apply = jax.random.uniform(k_apply) < prob
  lam_mix = jnp.where(apply, lam_mix, 1.0).astype(jnp.float32)
  use_cutmix = use_cutmix & apply
  # timm rand_bbox: box of side sqrt(1 - lam) * size (truncated), centre uniform, clipped.
  cut_ratio = jnp.sqrt(1.0 - lam_mix)
  cut_h = (height * cut_ratio).astype(jnp.int32)
  cut_w = (width * cut_ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  box_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  lam = jnp.where(use_cutmix, box_lam, lam_mix)
  return lam, use_cutmix, (y0, y1, x0, x1)


def mixup_cutmix(key, images, labels, *, num_classes: int, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1):
  """images [B, H, W, C], int labels [B] -> (mixed images, soft targets float32 [B, num_classes]).

  Jittable; the alphas must be Python floats. Both alphas 0: images unchanged, smoothed one-hots.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  params = mixup_cutmix_params(key, images.shape[1:3], mixup_alpha=mixup_alpha,
                               cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
  return apply_mixup_cutmix(params, images, labels, num_classes=num_classes,
                            label_smoothing=label_smoothing)


def apply_mixup_cutmix(params, images, labels, *, num_classes: int, label_smoothing: float):
  """Mixes a batch with given (lam, use_cutmix, box) from mixup_cutmix_params."""
  lam, use_cutmix, (y0, y1, x0, x1) = params
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  partner = images[::-1]
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut = jnp.where(in_box[None, :, :, None], partner, images)
  blend = (lam * images + (1.0 - lam) * partner).astype(images.dtype)
  mixed = jnp.where(use_cutmix, cut, blend)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
