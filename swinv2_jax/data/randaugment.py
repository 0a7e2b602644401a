"""RandAugment with timm semantics (`rand-m9-mstd0.5-inc1`), on PIL images, numpy randomness.

String keys: m = magnitude (0..10 scale), n = ops per image (2), mstd = std of a gaussian jitter of
the magnitude per op (> 100 = uniform in [0, m]), mmax = upper clip (10), p = probability
that each chosen op is applied (0.5), inc1 = the "increasing" op set, where a larger magnitude is
always a stronger distortion (inc0 or no inc: timm's original set). Ops are drawn with replacement,
as in timm.
"""

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_MAX_LEVEL = 10.0
_TRANSLATE_PCT = 0.45  # timm default translate_pct for the *Rel ops


def _signed(rng, v):
  return -v if rng.random() > 0.5 else v


def _affine(img, coeffs, ctx):
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=ctx["resample"],
                       fillcolor=ctx["fill"])


def _rotate(img, m, rng, ctx):
  degrees = _signed(rng, m / _MAX_LEVEL * 30.0)
  return img.rotate(degrees, resample=ctx["resample"], fillcolor=ctx["fill"])


def _shear_x(img, m, rng, ctx):
  return _affine(img, (1, _signed(rng, m / _MAX_LEVEL * 0.3), 0, 0, 1, 0), ctx)


def _shear_y(img, m, rng, ctx):
  return _affine(img, (1, 0, 0, _signed(rng, m / _MAX_LEVEL * 0.3), 1, 0), ctx)


def _translate_x_rel(img, m, rng, ctx):
  pixels = _signed(rng, m / _MAX_LEVEL * _TRANSLATE_PCT) * img.width
  return _affine(img, (1, 0, pixels, 0, 1, 0), ctx)


def _translate_y_rel(img, m, rng, ctx):
  pixels = _signed(rng, m / _MAX_LEVEL * _TRANSLATE_PCT) * img.height
  return _affine(img, (1, 0, 0, 0, 1, pixels), ctx)


def _enhancer(cls):
  # Increasing variant: factor 1 +- 0.9 * m/10, so larger m always moves further from identity.
  def op(img, m, rng, ctx):
    del ctx
    return cls(img).enhance(1.0 + _signed(rng, m / _MAX_LEVEL * 0.9))
  return op


def _posterize(img, bits):
  if bits >= 8:
    return img
  if bits <= 0:  # keeping 0 bits is all black; Pillow >= 11 refuses bits=0
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, bits)


def _posterize_increasing(img, m, rng, ctx):
  del rng, ctx
  return _posterize(img, 4 - int(m / _MAX_LEVEL * 4))


def _solarize_increasing(img, m, rng, ctx):
  del rng, ctx
  return ImageOps.solarize(img, 256 - int(m / _MAX_LEVEL * 256))


def _solarize_add(img, m, rng, ctx):
  del rng, ctx
  add = int(m / _MAX_LEVEL * 110)
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _enhancer_original(cls):
  # timm's original level map: factor 0.1 + 1.8 * m/10 (m = 5 is the identity).
  def op(img, m, rng, ctx):
    del rng, ctx
    return cls(img).enhance(m / _MAX_LEVEL * 1.8 + 0.1)
  return op


def _posterize_original(img, m, rng, ctx):
  del rng, ctx
  return _posterize(img, int(m / _MAX_LEVEL * 4))


def _solarize_original(img, m, rng, ctx):
  del rng, ctx
  return ImageOps.solarize(img, int(m / _MAX_LEVEL * 256))


def _no_magnitude(fn):
  def op(img, m, rng, ctx):
    del m, rng, ctx
    return fn(img)
  return op


OPS = {
    "AutoContrast": _no_magnitude(ImageOps.autocontrast),
    "Equalize": _no_magnitude(ImageOps.equalize),
    "Invert": _no_magnitude(ImageOps.invert),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhancer(ImageEnhance.Color),
    "ContrastIncreasing": _enhancer(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhancer(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}
INCREASING_OPS = tuple(OPS)
OPS.update({
    "Posterize": _posterize_original,
    "Solarize": _solarize_original,
    "Color": _enhancer_original(ImageEnhance.Color),
    "Contrast": _enhancer_original(ImageEnhance.Contrast),
    "Brightness": _enhancer_original(ImageEnhance.Brightness),
    "Sharpness": _enhancer_original(ImageEnhance.Sharpness),
})
# timm's default set (inc0): same ops, with the original level maps for these seven.
ORIGINAL_OPS = tuple(n.replace("Increasing", "") for n in INCREASING_OPS)


@dataclasses.dataclass(frozen=True)
class RandAugment:
  magnitude: float = _MAX_LEVEL  # timm's defaults for fields the string leaves out
  num_ops: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = _MAX_LEVEL
  prob: float = 0.5
  fill: tuple = (124, 116, 104)  # ImageNet mean in 0..255, timm's img_mean for geometric ops
  resample: int = Image.Resampling.BICUBIC
  increasing: bool = False  # timm's default is the original set; the Swin recipe asks for inc1

  @classmethod
  def from_string(cls, spec: str, **kwargs) -> "RandAugment":
    parts = spec.split("-")
    if parts[0] != "rand":
      raise ValueError(f'data.randaugment: must start with "rand-", got {spec!r}')
    fields = {}
    for part in parts[1:]:
      match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
      if not match:
        raise ValueError(f"data.randaugment: cannot parse {part!r} in {spec!r}")
      key, val = match.groups()
      try:
        if key == "m":
          fields["magnitude"] = float(val)
        elif key == "n":
          fields["num_ops"] = int(val)
        elif key == "mstd":
          fields["magnitude_std"] = math.inf if float(val) > 100 else float(val)
        elif key == "mmax":
          fields["magnitude_max"] = float(val)
        elif key == "p":
          fields["prob"] = float(val)
        elif key == "inc" and val in ("0", "1"):
          fields["increasing"] = val == "1"
        else:
          raise ValueError(f"unknown field {part!r}")
      except ValueError as e:
        raise ValueError(f"data.randaugment: {e} in {spec!r}") from None
    return cls(**fields, **kwargs)

  def _magnitude(self, rng: np.random.Generator) -> float:
    m = self.magnitude
    if self.magnitude_std == math.inf:
      m = rng.uniform(0.0, m)
    elif self.magnitude_std > 0:
      m = rng.normal(m, self.magnitude_std)
    return float(min(max(m, 0.0), self.magnitude_max))

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    ctx = {"fill": self.fill, "resample": self.resample}
    ops = INCREASING_OPS if self.increasing else ORIGINAL_OPS
    for name in rng.choice(ops, self.num_ops, replace=True):
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      img = OPS[name](img, self._magnitude(rng), rng, ctx)
    return img
