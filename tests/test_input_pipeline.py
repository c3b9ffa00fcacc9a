"""Tests for diffusion_jax/input_pipeline.py (and datasets/prepare.py)."""
import collections
import json
import os

from configs import default
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import input_pipeline
from diffusion_jax.datasets import prepare

SEED = 7


def _data_config(data_dir, **overrides):
  config = default.get_config().data
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  """`config.data` of the default config, digits built into a fresh dir."""
  config = _data_config(tmp_path_factory.mktemp("tfds"))
  input_pipeline.prepare_dataset(config)  # Builds digits, offline.
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _stored(config, split):
  """(image bytes, label) of every record of a split, straight from TFDS."""
  builder = tfds.builder(config.name, data_dir=config.data_dir)
  source = builder.as_data_source(split=split)
  return [(np.asarray(source[i]["image"]).tobytes(), int(source[i]["label"]))
          for i in range(len(source))]


def test_prepare_builds_digits_as_array_record(config):
  builder = input_pipeline.prepare_dataset(config)
  assert builder.is_prepared()
  assert {f.value for f in builder.info.available_file_formats()} == {
      "array_record"}
  info = input_pipeline.split_info(config)
  assert info == input_pipeline.SplitInfo(1497, 10, (16, 16, 1))
  assert input_pipeline.split_info(config, "test").num_examples == 300


def test_train_batches_shapes_dtypes_range(config):
  it = input_pipeline.create_train_iterator(
      config, 64, SEED, process_index=0, process_count=1)
  for batch in _take(it, 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (64, 16, 16, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    # Exact affine map of uint8: both ends are hit exactly.
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9


def test_process_shards_are_disjoint_and_cover_the_split(config):
  stored = _stored(config, "train")
  shards = []
  for index in range(2):
    it = input_pipeline.create_train_iterator(
        config, 16, SEED, process_index=index, process_count=2)
    size = len(range(index, len(stored), 2))  # 749 and 748.
    batches = _take(it, -(-size // 8))  # Local batch 8; first epoch only.
    images = np.concatenate([b["image"] for b in batches])[:size]
    labels = np.concatenate([b["label"] for b in batches])[:size]
    shards.append(collections.Counter(
        (x.tobytes(), int(y)) for x, y in zip(_to_uint8(images), labels)))
  assert sum(shards[0].values()) + sum(shards[1].values()) == len(stored)
  # As multisets: shard 0 + shard 1 == the split, so the shards are disjoint
  # sets of records whose union is the whole split.
  assert shards[0] + shards[1] == collections.Counter(stored)
  assert shards[0] == collections.Counter(stored[0::2])


def test_shuffle_is_deterministic_in_the_seed(config):
  def first(seed):
    return next(input_pipeline.create_train_iterator(
        config, 32, seed, process_index=0, process_count=1))["image"]
  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


def test_exact_resume_from_state(config):
  flip_config = _data_config(config.data_dir, random_flip=True)
  it = input_pipeline.create_train_iterator(
      flip_config, 64, SEED, process_index=0, process_count=1)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint keeps it.
  assert len(json.dumps(state)) < 1024
  expected = _take(it, 3)
  resumed = input_pipeline.create_train_iterator(
      flip_config, 64, SEED, process_index=0, process_count=1)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 3)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_state_of_another_pipeline_is_rejected(config):
  it = input_pipeline.create_train_iterator(
      config, 64, SEED, process_index=0, process_count=1)
  other = input_pipeline.create_train_iterator(
      config, 64, SEED + 1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(it.get_state())


def test_flips_are_random_at_half_rate_and_deterministic(config):
  flip_config = _data_config(config.data_dir, random_flip=True)

  def images(cfg, n=20):
    it = input_pipeline.create_train_iterator(
        cfg, 64, SEED, process_index=0, process_count=1)
    return np.concatenate([b["image"] for b in _take(it, n)])

  plain, flipped = images(config), images(flip_config)
  np.testing.assert_array_equal(flipped, images(flip_config))
  mirrored = plain[:, :, ::-1]
  same = (flipped == plain).all(axis=(1, 2, 3))
  mirror = (flipped == mirrored).all(axis=(1, 2, 3))
  assert (same | mirror).all()  # Same order; each image as is or mirrored.
  asymmetric = ~(plain == mirrored).all(axis=(1, 2, 3))
  rate = mirror[asymmetric].mean()
  # 1,280 draws: the standard error of the rate is 0.014.
  assert 0.44 < rate < 0.56, rate


def test_eval_iterator_is_one_padded_pass_in_order(config):
  stored = _stored(config, "test")
  batches = list(input_pipeline.create_eval_iterator(
      config, 64, process_index=0, process_count=1))
  assert [int(b["mask"].sum()) for b in batches] == [64, 64, 64, 64, 44]
  batch = batches[-1]
  assert batch["image"].shape == (64, 16, 16, 1) and batch["mask"].dtype == bool
  images = _to_uint8(np.concatenate([b["image"] for b in batches]))[:300]
  labels = np.concatenate([b["label"] for b in batches])[:300]
  assert [(x.tobytes(), int(y)) for x, y in zip(images, labels)] == stored


def test_eval_iterator_per_process(config):
  stored = _stored(config, "test")
  seen = collections.Counter()
  for index in range(2):
    batches = list(input_pipeline.create_eval_iterator(
        config, 64, process_index=index, process_count=2))
    assert len(batches) == 5  # ceil(150 / 32) on both processes.
    for b in batches:
      assert b["image"].shape[0] == 32
      keep = b["mask"]
      seen.update((x.tobytes(), int(y)) for x, y in
                  zip(_to_uint8(b["image"][keep]), b["label"][keep]))
  assert seen == collections.Counter(stored)


@pytest.mark.parametrize("image_size", [32, 16])
def test_mocked_cifar10(tmp_path, image_size):
  cfg = _data_config(tmp_path, name="cifar10", channels=3, num_classes=10,
                     image_size=image_size, random_flip=True)
  # AUTO falls back to USE_CODE (no metadata ships with tfds 4.9.10); the
  # mock serves `as_data_source` with random images and nothing on disk.
  with tfds.testing.mock_data(num_examples=24):
    it = input_pipeline.create_train_iterator(
        cfg, 8, SEED, process_index=1, process_count=2)
    batches = _take(it, 4)
    state = it.get_state()
    resumed = input_pipeline.create_train_iterator(
        cfg, 8, SEED, process_index=1, process_count=2)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(it)["image"], next(resumed)["image"])
    evals = list(input_pipeline.create_eval_iterator(
        cfg, 16, process_index=0, process_count=1))
  for batch in batches:
    assert batch["image"].shape == (4, image_size, image_size, 3)
    assert batch["image"].dtype == np.float32
    assert np.abs(batch["image"]).max() <= 1.0
    assert batch["label"].dtype == np.int32
  assert [int(b["mask"].sum()) for b in evals] == [16, 8]


def test_missing_dataset_names_the_prepare_command(tmp_path):
  cfg = _data_config(tmp_path, name="cifar10", channels=3)
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.create_train_iterator(
        cfg, 8, SEED, process_index=0, process_count=1)
  message = str(error.value)
  assert (f"python -m diffusion_jax.datasets.prepare cifar10 "
          f"--data_dir={tmp_path}\n" in message)
  assert (f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}"
          in message)
  assert not os.listdir(tmp_path)  # Nothing was downloaded or written.


def test_tfrecord_only_dataset_is_a_clear_error(tmp_path):
  tfds.builder("digits", data_dir=str(tmp_path)).download_and_prepare(
      file_format="tfrecord",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  with pytest.raises(ValueError, match="only as .'tfrecord'.") as error:
    input_pipeline.prepare_dataset(_data_config(tmp_path))
  assert "python -m diffusion_jax.datasets.prepare digits" in str(error.value)
  assert "convert_format" in str(error.value)


def test_prepare_command_builds_offline(tmp_path, capsys):
  prepare.main(["digits", f"--data_dir={tmp_path}"])
  assert "digits/1.0.0 is ready" in capsys.readouterr().out
  assert input_pipeline.prepare_dataset(_data_config(tmp_path)).is_prepared()


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="Unknown data set 'no_such_set'"):
    input_pipeline.prepare_dataset(_data_config(tmp_path, name="no_such_set"))


def test_batch_must_divide(config):
  with pytest.raises(ValueError, match="63 does not divide over the 2 processes"):
    input_pipeline.create_train_iterator(
        config, 63, SEED, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="64 does not divide over the 3 dev"):
    input_pipeline.check_batch(64, num_devices=3)
  assert input_pipeline.check_batch(64, num_devices=4, process_count=2) == 32


def test_config_must_match_the_data(config):
  with pytest.raises(ValueError, match="1-channel images .*channels = 3"):
    input_pipeline.create_train_iterator(
        _data_config(config.data_dir, channels=3), 8, SEED,
        process_index=0, process_count=1)
  with pytest.raises(ValueError, match="10 classes .*num_classes = 0"):
    input_pipeline.create_train_iterator(
        _data_config(config.data_dir, num_classes=0), 8, SEED,
        process_index=0, process_count=1)


def test_resize_to_a_different_size(config):
  it = input_pipeline.create_train_iterator(
      _data_config(config.data_dir, image_size=8), 16, SEED,
      process_index=0, process_count=1)
  images = _to_uint8(next(it)["image"])
  assert images.shape == (16, 8, 8, 1)
  # Digits are 2x2 blocks, so box halving gives back the 8x8 source exactly.
  reference = input_pipeline.create_train_iterator(
      config, 16, SEED, process_index=0, process_count=1)
  np.testing.assert_array_equal(
      images, _to_uint8(next(reference)["image"])[:, ::2, ::2])


def test_center_crop_resize():
  image = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4, 1)
  out = input_pipeline.center_crop_resize(image, 4)
  np.testing.assert_array_equal(out, image[1:5])  # Square centre crop only.
  rgb = np.random.default_rng(0).integers(0, 256, (40, 64, 3), np.uint8)
  assert input_pipeline.center_crop_resize(rgb, 16).shape == (16, 16, 3)
  assert input_pipeline.center_crop_resize(rgb, 48).shape == (48, 48, 3)


def test_default_process_is_jax_process(config):
  batch = next(input_pipeline.create_train_iterator(config, 8, SEED))
  assert batch["image"].shape == (8, 16, 16, 1)  # One JAX process here.


def test_worker_processes_give_the_same_stream_and_resume(config):
  """grain worker processes (spawned) change neither the stream nor resume."""
  worker_config = _data_config(config.data_dir, random_flip=True,
                               worker_count=2)
  reference = input_pipeline.create_train_iterator(
      _data_config(config.data_dir, random_flip=True), 32, SEED,
      process_index=0, process_count=1)
  expected = _take(reference, 5)
  it = input_pipeline.create_train_iterator(
      worker_config, 32, SEED, process_index=0, process_count=1)
  resumed = input_pipeline.create_train_iterator(
      worker_config, 32, SEED, process_index=0, process_count=1)
  try:
    got = _take(it, 3)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    got += _take(resumed, 2)
  finally:
    it.close()
    resumed.close()
  for want, have in zip(expected, got):
    np.testing.assert_array_equal(want["image"], have["image"])
    np.testing.assert_array_equal(want["label"], have["label"])


def test_in_memory_cache_gives_the_same_stream(config):
  cached = config.copy_and_resolve_references()
  cached.update(cache_max_mb=512, random_flip=True)
  uncached = config.copy_and_resolve_references()
  uncached.update(cache_max_mb=0, random_flip=True)
  assert input_pipeline._fits_in_memory(cached, 1497)
  assert not input_pipeline._fits_in_memory(uncached, 1497)
  a = input_pipeline.create_train_iterator(cached, 64, SEED)
  b = input_pipeline.create_train_iterator(uncached, 64, SEED)
  # 30 batches of 64 cross an epoch boundary of the 1,497 training images.
  for _ in range(30):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  c = input_pipeline.create_train_iterator(uncached, 64, SEED)
  c.set_state(a.get_state())  # states are interchangeable
  np.testing.assert_array_equal(next(c)["image"], next(a)["image"])
