"""Per-example image transforms (PIL + numpy), each drawing randomness from a numpy Generator.

The generator is the per-record one grain hands to a RandomMap, so every output is a pure function
of (seed, position in the stream).
"""

import math

import numpy as np
from PIL import Image

PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_rgb_pil(image: np.ndarray) -> Image.Image:
  """uint8 HxW, HxWx1 or HxWx3 array -> RGB PIL image (grayscale is replicated to 3 channels)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    return Image.fromarray(image, mode="L").convert("RGB")
  if image.shape[-1] == 4:
    return Image.fromarray(image, mode="RGBA").convert("RGB")
  return Image.fromarray(image, mode="RGB")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio):
  """(left, top, w, h): area fraction uniform in `scale`, aspect log-uniform in `ratio`.

  torchvision/timm RandomResizedCrop: 10 tries, then a center crop with the aspect clamped.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(rng, img: Image.Image, size_hw, scale, ratio,
                        interpolation="bicubic") -> Image.Image:
  left, top, w, h = random_resized_crop_box(rng, img.width, img.height, scale, ratio)
  return img.resize((size_hw[1], size_hw[0]), PIL_RESAMPLE[interpolation],
                    box=(left, top, left + w, top + h))


def resize_center_crop(img: Image.Image, size_hw, crop_ratio: float,
                       interpolation="bicubic") -> Image.Image:
  """Official eval (TEST.CROP=True): resize to cover int(size / ratio) keeping aspect, center crop.

  For a square size this is exactly `Resize(int(size / ratio))` (shorter side) + `CenterCrop(size)`.
  """
  target_h, target_w = int(size_hw[0] / crop_ratio), int(size_hw[1] / crop_ratio)
  # The side that needs the larger scale gets its target exactly; the other is truncated as in
  # torchvision's Resize(int).
  if target_h * img.width >= target_w * img.height:
    new_h, new_w = target_h, max(target_w, int(target_h * img.width / img.height))
  else:
    new_h, new_w = max(target_h, int(target_w * img.height / img.width)), target_w
  img = img.resize((new_w, new_h), PIL_RESAMPLE[interpolation])
  # torchvision CenterCrop rounds the offset: int(round((in - out) / 2)).
  top, left = int(round((new_h - size_hw[0]) / 2)), int(round((new_w - size_hw[1]) / 2))
  return img.crop((left, top, left + size_hw[1], top + size_hw[0]))


def normalize(img: Image.Image, mean, std) -> np.ndarray:
  """(x / 255 - mean) / std as one multiply and one subtract, in place (float32 [H, W, 3])."""
  std = np.asarray(std, np.float64)
  x = np.array(img, dtype=np.float32)
  x *= (1.0 / (255.0 * std)).astype(np.float32)
  x -= (np.asarray(mean, np.float64) / std).astype(np.float32)
  return x


def random_erase(rng: np.random.Generator, x: np.ndarray, prob: float,
                 min_area=0.02, max_area=1.0 / 3.0, min_aspect=0.3) -> np.ndarray:
  """timm RandomErasing, mode 'pixel', one box: fill a random box with per-pixel N(0, 1) noise.

  Applied after normalisation, so the noise is on the normalised scale (as in timm).
  """
  if prob <= 0 or rng.random() >= prob:
    return x
  height, width, channels = x.shape
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      x = x.copy()
      x[top:top + h, left:left + w] = rng.standard_normal((h, w, channels), dtype=np.float32)
      return x
  return x


def simmim_mask(rng: np.random.Generator, image_size, mask_patch_size: int = 32,
                model_patch_size: int = 4, mask_ratio: float = 0.6) -> np.ndarray:
  """SimMIM MaskGenerator: int32 [H/model_patch, W/model_patch], 1 = masked token.

  ceil(cells * ratio) of the (H/mask_patch) x (W/mask_patch) cells are masked, chosen by a random
  permutation, then each cell is repeated mask_patch/model_patch times along both axes.
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  check_mask_config(height, width, mask_patch_size, model_patch_size, mask_ratio)
  cells_h, cells_w = height // mask_patch_size, width // mask_patch_size
  num_cells = cells_h * cells_w
  num_masked = int(math.ceil(num_cells * mask_ratio))
  flat = np.zeros(num_cells, np.int32)
  flat[rng.permutation(num_cells)[:num_masked]] = 1
  rep = mask_patch_size // model_patch_size
  return np.repeat(np.repeat(flat.reshape(cells_h, cells_w), rep, axis=0), rep, axis=1)


def check_mask_config(height, width, mask_patch_size, model_patch_size, mask_ratio):
  if height % mask_patch_size or width % mask_patch_size:
    raise ValueError(f"mask.mask_patch_size: image size {height}x{width} is not a multiple of "
                     f"mask_patch_size {mask_patch_size}")
  if mask_patch_size % model_patch_size:
    raise ValueError(f"mask.model_patch_size: mask_patch_size {mask_patch_size} is not a "
                     "multiple of "
                     f"model_patch_size {model_patch_size}")
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask.mask_ratio: must be in (0, 1), got {mask_ratio}")
