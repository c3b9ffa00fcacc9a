"""Tests for the offline `digits` TFDS builder (datasets/digits.py)."""
import os

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from diffusion_jax import datasets as offline_datasets
from diffusion_jax.datasets import digits

SPLITS = {"train": 1497, "test": 300}


def _build(data_dir) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("digits", data_dir=str(data_dir))
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _read(builder, split: str) -> dict[str, np.ndarray]:
  """All examples of a split in stored order, stacked."""
  source = builder.as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(e[k]) for e in examples])
          for k in ("image", "label", "id")}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  """The data set built twice, into two separate data dirs."""
  return [_build(tmp_path_factory.mktemp(f"digits_{i}")) for i in range(2)]


@pytest.fixture(scope="module")
def data(builds):
  return {split: _read(builds[0], split) for split in SPLITS}


def test_importing_the_package_registers_the_builder(builds):
  assert offline_datasets.OFFLINE_BUILDERS["digits"] is digits.Digits
  assert isinstance(builds[0], digits.Digits)
  assert str(builds[0].version) == "1.0.0"
  assert builds[0].info.file_format.value == "array_record"


def test_build_is_deterministic(builds):
  for split in SPLITS:
    first, second = (_read(b, split) for b in builds)
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])
    # Byte-identical files, not just equal decoded values.
    name = f"digits-{split}.array_record-00000-of-00001"
    paths = [os.path.join(b.data_dir, name) for b in builds]
    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
      assert f0.read() == f1.read()


def test_split_sizes_and_partition(builds, data):
  for split, size in SPLITS.items():
    assert builds[0].info.splits[split].num_examples == size
    assert len(data[split]["id"]) == size
  ids = np.concatenate([data[s]["id"] for s in SPLITS])
  np.testing.assert_array_equal(np.sort(ids), np.arange(1797))


def test_features(data):
  for split in SPLITS:
    assert data[split]["image"].shape == (SPLITS[split], 16, 16, 1)
    assert data[split]["image"].dtype == np.uint8
    assert data[split]["image"].max() == 255 and data[split]["image"].min() == 0


def test_labels_cover_all_classes_in_proportion(data):
  total = np.bincount(sk_datasets.load_digits().target, minlength=10)
  for split, size in SPLITS.items():
    counts = np.bincount(data[split]["label"], minlength=10)
    assert (counts > 0).all()
    # Stratified: each class within one example of its exact share.
    np.testing.assert_array_less(np.abs(counts - total * size / 1797), 1.0)


def test_split_is_the_documented_one(data):
  source = sk_datasets.load_digits()
  train, test = digits.split_indices(source.target)
  np.testing.assert_array_equal(np.sort(data["test"]["id"]), test)
  np.testing.assert_array_equal(np.sort(data["train"]["id"]), train)
  # Pinned, so a change of the rule or of NumPy's RandomState shows up here.
  assert test[:8].tolist() == [3, 7, 13, 19, 36, 43, 48, 53]
  assert int(test.sum()) == 259905


def test_images_match_sklearn_after_documented_upscaling(data):
  source = sk_datasets.load_digits()
  for split in SPLITS:
    ids = data[split]["id"]
    # Independent of the builder's code: float rounding, then kron for 2x2.
    scaled = np.floor(source.images[ids] * 255.0 / 16.0 + 0.5)
    expected = np.stack([np.kron(x, np.ones((2, 2))) for x in scaled])
    np.testing.assert_array_equal(data[split]["image"][..., 0], expected)
    np.testing.assert_array_equal(data[split]["label"], source.target[ids])
    # Nearest-neighbour upscaling loses nothing: the 8x8 source comes back.
    back = data[split]["image"][:, ::2, ::2, 0].astype(np.int64)
    np.testing.assert_array_equal((back * 16 + 127) // 255,
                                  source.images[ids].astype(np.int64))


def test_scaling_rounds_half_up_and_hits_the_endpoints():
  values = np.arange(17)
  # Each source value in its own row of an 8x8 image, then read back.
  out = np.concatenate([
      digits.to_uint8_16x16(np.tile(values[i:i + 8, None], (1, 1, 8)))
      [0, ::2, 0, 0] for i in (0, 8)])
  assert out.shape == (16,)
  np.testing.assert_array_equal(
      out, [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207,
            223, 239])
  assert digits.to_uint8_16x16(np.full((1, 8, 8), 16))[0, 0, 0, 0] == 255
  with pytest.raises(ValueError, match="0..16"):
    digits.to_uint8_16x16(np.full((1, 8, 8), 17))
