"""`digits`: the 8x8 handwritten digits that ship with scikit-learn, as a tfds data set.

1,797 grayscale images (UCI optdigits test set, 10 classes). Stored as uint8 images of shape
(8, 8, 1): the original 0..16 intensities are rescaled to 0..255 (round(v * 255 / 16)) so that
the usual uint8 -> float pipeline applies unchanged; the input pipeline turns them into 3 channels.
Splits: `test` is a fixed stratified 20% (360 images, 36 +- 1 per class), `train` the remaining 1,437.
No download: tfds.builder('digits', data_dir=d, file_format='array_record').download_and_prepare().
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_TEST = 360
_SPLIT_SEED = 20220401  # fixed: the test split must never change between versions of this code


def stratified_test_indices(labels: np.ndarray, num_test: int,
                            seed: int = _SPLIT_SEED) -> np.ndarray:
  """Sorted indices of a stratified held-out set of exactly `num_test` examples.

  Per-class quotas by largest remainder, members drawn from a seeded PCG64 permutation (numpy
  guarantees that stream is stable), so the split does not depend on the scikit-learn version.
  """
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_test / len(labels)
  quota = np.floor(exact).astype(int)
  short = num_test - quota.sum()
  quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
  rng = np.random.default_rng(seed)
  picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
  return np.sort(np.concatenate(picked))


def _png(image_8x8: np.ndarray) -> bytes:
  pixels = np.round(image_8x8 * (255.0 / 16.0)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels, mode="L").save(buf, format="PNG")
  return buf.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (8x8, 10 classes) with a fixed stratified test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Handwritten digits from sklearn.datasets.load_digits, scaled to 0..255.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8, encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    test = stratified_test_indices(labels, NUM_TEST)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {
        "train": self._generate_examples(digits.images, labels, train),
        "test": self._generate_examples(digits.images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      # Key = index in load_digits, so an example can be traced back to its source.
      yield int(i), {"image": _png(images[i]), "label": int(labels[i])}
