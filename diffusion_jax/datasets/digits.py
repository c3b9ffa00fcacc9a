"""`digits`: scikit-learn's handwritten digits as a TFDS data set, offline.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set
inside its wheel (`sklearn.datasets.load_digits`): 1,797 grayscale 8x8 images
with integer values 0..16 and labels 0..9. This builder turns them into a small
real image data set that needs no network, so the default training run and the
tests work on a machine that can only reach package registries.

What is stored, per example:
  image: uint8 [16, 16, 1] in 0..255. Each source value v in 0..16 is mapped
    to round(v * 255 / 16) (halves rounded up), then every pixel is repeated
    into a 2x2 block (nearest-neighbour upscaling).
  label: the digit, ClassLabel with 10 classes.
  id: int32, the index of the image in `load_digits()`, so every stored
    example can be traced back to its source.

Splits (fixed, stratified by label, no dependence on scikit-learn's splitting
code): for each class, `test` takes `round(300 * n_class / 1797)` examples
(largest-remainder rounding so the counts sum to exactly 300) chosen by
`numpy.random.RandomState(SPLIT_SEED).permutation` of that class's indices;
the rest go to `train`. Result: 1,497 train and 300 test examples, each split
holding all ten classes in the source proportions. On disk, TFDS orders the
examples of each split by a fixed hash of their key (the `id`), the same on
every build.

Build it with `tfds build digits --imports diffusion_jax.datasets
--file_format=array_record`, or let `input_pipeline.prepare_dataset` build it
on first use (about two seconds).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

SOURCE_SIZE = 8  # Side of scikit-learn's images.
IMAGE_SIZE = 16  # Side of the stored images.
SOURCE_MAX = 16  # Source pixel values lie in 0..16.
NUM_CLASSES = 10
NUM_TEST = 300  # 1,797 - 300 = 1,497 train examples.
# Legacy RandomState is used on purpose: NumPy freezes its stream (NEP 19), so
# the split stays the same across NumPy versions; `default_rng` makes no such
# promise.
SPLIT_SEED = 0


def load_source() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits as stored, before any scaling.

  Returns:
    images: int64 [1797, 8, 8] with values in 0..16.
    labels: int64 [1797] with values in 0..9.
  """
  # Imported here so that reading a prepared data set does not need sklearn.
  # pylint: disable-next=g-import-not-at-top
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  return digits.images.astype(np.int64), digits.target.astype(np.int64)


def to_uint8_16x16(images: np.ndarray) -> np.ndarray:
  """Scales 0..16 source digits to uint8 0..255 and upscales them 2x.

  Nearest-neighbour (each pixel becomes a 2x2 block) keeps the data exact:
  every stored value is a source value, `image[::2, ::2]` gives back the
  8x8 digit, and no blurred in-between values are invented that the model
  would then have to learn. Bilinear upscaling would do all three.

  Args:
    images: integer [N, 8, 8] with values in 0..16.

  Returns:
    uint8 [N, 16, 16, 1] with values in 0..255.
  """
  images = np.asarray(images, np.int64)
  if images.min() < 0 or images.max() > SOURCE_MAX:
    raise ValueError(f"Source values must lie in 0..{SOURCE_MAX}.")
  # Integer round-half-up of v * 255 / 16: exact, no float rounding questions.
  scaled = (images * 255 + SOURCE_MAX // 2) // SOURCE_MAX
  factor = IMAGE_SIZE // SOURCE_SIZE
  upscaled = np.repeat(np.repeat(scaled, factor, axis=1), factor, axis=2)
  return upscaled.astype(np.uint8)[..., None]


def split_indices(labels: np.ndarray,
                  num_test: int = NUM_TEST,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """The fixed stratified train/test split of the source indices.

  Args:
    labels: int [N] class of each source image.
    num_test: total size of the test split.
    seed: seed of the per-class permutations.

  Returns:
    (train, test): sorted int64 index arrays that partition range(N).
  """
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  # Largest-remainder rounding: per-class shares that sum to exactly num_test.
  quota = counts * num_test / len(labels)
  per_class = np.floor(quota).astype(np.int64)
  shortfall = num_test - per_class.sum()
  # Stable sort so ties are broken by class order, deterministically.
  per_class[np.argsort(-(quota - per_class), kind="stable")[:shortfall]] += 1
  rng = np.random.RandomState(seed)
  test = []
  for cls, n_test in zip(classes, per_class):
    members = np.flatnonzero(labels == cls)
    test.append(members[rng.permutation(len(members))[:n_test]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, upscaled to 16x16 (no network)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 1,497 train / 300 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "id": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        citation=(
            "@misc{uci_digits, author={Alpaydin, E. and Kaynak, C.}, "
            "title={Optical Recognition of Handwritten Digits}, "
            "year={1998}, howpublished={UCI Machine Learning Repository}}"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    images, labels = load_source()
    train, test = split_indices(labels)
    images = to_uint8_16x16(images)
    return {
        "train": self._generate_examples(images, labels, train),
        "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(
      self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
  ) -> Iterator[tuple[int, dict[str, object]]]:
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]), "id": int(i)}
