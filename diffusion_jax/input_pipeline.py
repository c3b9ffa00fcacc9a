"""Input: TFDS image data sets -> per-process numpy batches, through grain.

Reading goes through `tfds.data_source` (ArrayRecord files, random access; no
TensorFlow needed) and grain's index-based `MapDataset`:

  source[process_index::process_count]  each process reads only its shard
    .shuffle(seed).repeat()              a new order every epoch, from the seed
    .map(decode, crop/resize, check)     uint8 [H, W, C]
    .random_map(flip)                    seeded by (seed, position in stream)
    .batch(local_batch).map(to [-1, 1])
    .to_iter_dataset()                   prefetching threads (+ processes)

Every stage is a function of the element's index, so the stream is a function
of (seed, batch number): the iterator state is a batch counter plus a few
fields that identify the pipeline, a few hundred bytes of JSON, and restoring
it restores the exact stream. It is the same on every process, so saving one
copy (or one per process with `grain.checkpoint`) suffices.

Nothing here downloads: `prepare_dataset` (datasets/prepare.py) builds
`digits` offline on first use; any other data set must be prepared beforehand
(the error names the command).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from diffusion_jax.datasets.prepare import prepare_dataset

__all__ = [
    "Batch", "SplitInfo", "TrainIterator", "center_crop_resize", "check_batch",
    "create_eval_iterator", "create_train_iterator", "prepare_dataset",
    "split_info",
]

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1
# Threads that each assemble whole batches, and batches buffered per process:
# few, since batches of large images are big and a small host gains nothing
# from a deep buffer (grain's defaults, 16 and 500, suit remote file systems).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


# ----------------------------------------------------------------------------
# Data set facts and checks.


class SplitInfo(NamedTuple):
  """What a split holds, for logging and eval bookkeeping."""
  num_examples: int
  num_classes: int  # 0 if the data set has no ClassLabel 'label'.
  image_shape: tuple[int | None, ...]  # Stored [H, W, C]; None if it varies.


def split_info(data_config: ml_collections.ConfigDict,
               split: str | None = None) -> SplitInfo:
  """Size, label count and stored image shape of a split (train by default)."""
  builder = prepare_dataset(data_config)
  source = builder.as_data_source(split=split or data_config.train_split)
  return SplitInfo(len(source), _num_classes(builder),
                   tuple(builder.info.features["image"].shape))


def check_split(data_config: ml_collections.ConfigDict, split: str, field: str) -> None:
  """Raises ValueError naming the config field when the data set lacks `split`."""
  try:
    split_info(data_config, split)
  except ValueError as e:
    if "split" not in str(e).lower():
      raise
    raise ValueError(f"{field}={split!r}: {e}") from e


def _num_classes(builder: tfds.core.DatasetBuilder) -> int:
  features = builder.info.features
  if "label" in features and isinstance(features["label"],
                                        tfds.features.ClassLabel):
    return features["label"].num_classes
  return 0


def _check_features(builder: tfds.core.DatasetBuilder,
                    data_config: ml_collections.ConfigDict) -> None:
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"Data set {builder.name!r} has no 'image' feature; it "
                     f"has {sorted(features.keys())}.")
  channels = features["image"].shape[-1]
  if channels is not None and channels != data_config.channels:
    raise ValueError(
        f"Data set {builder.name!r} has {channels}-channel images but "
        f"config.data.channels = {data_config.channels}; set it to {channels}.")
  num_classes = _num_classes(builder)
  if num_classes != data_config.num_classes:
    raise ValueError(
        f"Data set {builder.name!r} has {num_classes} classes but "
        f"config.data.num_classes = {data_config.num_classes}; set it to "
        f"{num_classes}.")
  key = data_config.get("caption_key", "")
  if key and key not in features:
    raise ValueError(f"Data set {builder.name!r} has no {key!r} feature for "
                     f"data.caption_key; it has {sorted(features.keys())}.")


# ----------------------------------------------------------------------------
# Per-example and per-batch transforms (classes, so they pickle into workers).


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Square centre crop and resize, as improved-diffusion/ADM prepare images.

  Box-filter halving while the short side is at least twice `size` (exact
  area averaging for power-of-two factors, no aliasing), then bicubic to
  `size` on the short side, then a centre crop.

  Args:
    image: uint8 [H, W, C].
    size: output side.

  Returns:
    uint8 [size, size, C]; `image` itself if it already has that shape.
  """
  height, width, channels = image.shape
  if height == width == size:
    return image
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  while min(pil.size) >= 2 * size:
    pil = pil.reduce(2)
  if min(pil.size) != size:
    scale = size / min(pil.size)
    pil = pil.resize((max(size, round(pil.size[0] * scale)),
                      max(size, round(pil.size[1] * scale))), Image.BICUBIC)
  array = np.asarray(pil).reshape(pil.size[1], pil.size[0], channels)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class _Preprocess(grain.transforms.Map):
  """Decoded TFDS example -> {'image': uint8 [S, S, C], 'label': int32}, plus
  'low_res': uint8 [s, s, C] (the image downsampled, anti-aliased) when
  `low_res_size` > 0, for super-resolution stages."""
  image_size: int
  channels: int
  has_label: bool
  low_res_size: int = 0
  caption_key: str = ""

  def map(self, features: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(features["image"])
    if image.shape[-1] != self.channels:
      raise ValueError(f"Image with shape {image.shape} has "
                       f"{image.shape[-1]} channels, expected {self.channels}.")
    out = {
        "image": center_crop_resize(image, self.image_size),
        "label": np.int32(features["label"] if self.has_label else 0),
    }
    if self.caption_key:  # bytes; the train loop turns captions into arrays
      out["caption"] = np.bytes_(features[self.caption_key])
    if self.low_res_size:
      # From the image at data.image_size (already cropped and resized): the
      # low-resolution half of the pair is a pure downsampling of the target.
      out["low_res"] = center_crop_resize(out["image"], self.low_res_size)
    if "mask" in features:
      out["mask"] = np.bool_(features["mask"])
    return out


class _RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2; rng is grain's, per position."""

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
      element = {**element, "image": element["image"][:, ::-1]}
      if "low_res" in element:  # the pair is flipped together
        element["low_res"] = element["low_res"][:, ::-1]
    return element


class _ToFloat(grain.transforms.Map):
  """uint8 [B, H, W, C] -> float32 in [-1, 1], once per batch (vectorised)."""

  def map(self, batch: Batch) -> Batch:
    out = {**batch, "image": batch["image"].astype(np.float32) / 127.5 - 1.0}
    if "low_res" in batch:
      out["low_res"] = batch["low_res"].astype(np.float32) / 127.5 - 1.0
    return out


# ----------------------------------------------------------------------------
# Iterators.


def check_batch(global_batch: int, num_devices: int,
                process_count: int = 1) -> int:
  """Checks that a global batch splits evenly; returns the per-process batch.

  Raises:
    ValueError: `global_batch` is not a multiple of `process_count` or of
      `num_devices` (all devices of all hosts).
  """
  for count, what in ((process_count, "processes"), (num_devices, "devices")):
    if count < 1 or global_batch % count:
      raise ValueError(
          f"The global batch size {global_batch} does not divide over the "
          f"{count} {what}: it must be a multiple of the process count and "
          "of the device count (all devices of all hosts).")
  return global_batch // process_count


class _Setup(NamedTuple):
  builder: tfds.core.DatasetBuilder
  source: Any  # Random-access sequence of decoded examples.
  preprocess: _Preprocess
  local_batch: int
  process_index: int
  process_count: int


def _setup(data_config: ml_collections.ConfigDict, global_batch: int,
           split: str, process_index: int | None,
           process_count: int | None) -> _Setup:
  """What both iterators need: checked sizes, the source, the preprocessing."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when not given)
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  local_batch = check_batch(global_batch, 1, process_count)
  builder = prepare_dataset(data_config)
  _check_features(builder, data_config)
  low_res_size = data_config.get("low_res_size", 0)
  if low_res_size and not 0 < low_res_size < data_config.image_size:
    raise ValueError(f"data.low_res_size={low_res_size} must lie in (0, data.image_size="
                     f"{data_config.image_size}); 0 turns low-resolution pairs off.")
  preprocess = _Preprocess(data_config.image_size, data_config.channels,
                           _num_classes(builder) > 0, low_res_size,
                           data_config.get("caption_key", ""))
  return _Setup(builder, builder.as_data_source(split=split), preprocess,
                local_batch, process_index, process_count)


def _fits_in_memory(data_config: ml_collections.ConfigDict, num_examples: int) -> bool:
  """Whether `num_examples` preprocessed images fit in data.cache_max_mb."""
  limit = data_config.get("cache_max_mb", 0)
  nbytes = num_examples * data_config.image_size**2 * data_config.channels
  return limit > 0 and nbytes <= limit * 2**20


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator of per-process batches with an exact, JSON state.

  Yields {'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]}.
  `get_state()` is a small JSON-able dict; `set_state` on an iterator built
  with the same config, seed and process count resumes the exact stream. As a
  `grain.DatasetIterator` it also works with `grain.checkpoint.CheckpointSave`.
  """

  def __init__(self, parent: grain.DatasetIterator, identity: dict[str, Any]):
    super().__init__(parent)
    self._identity = identity

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {**self._identity, "pipeline": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    diffs = {k: (state.get(k), v) for k, v in self._identity.items()
             if state.get(k) != v}
    if diffs:
      raise ValueError(
          "This iterator state belongs to a different input pipeline, so it "
          "cannot restore the same stream; (saved, current): " + ", ".join(
              f"{k}={a!r} vs {b!r}" for k, (a, b) in sorted(diffs.items())))
    self._parent.set_state(state["pipeline"])


def create_train_iterator(data_config: ml_collections.ConfigDict,
                          global_batch_size: int, seed: int, *,
                          process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """Infinite, shuffled, per-process training batches.

  Args:
    data_config: the `config.data` section.
    global_batch_size: batch summed over all processes.
    seed: data seed; the order and the flips follow from it alone.
    process_index: this process, default `jax.process_index()`.
    process_count: processes, default `jax.process_count()`.

  Returns:
    A `TrainIterator` yielding {'image': float32 [B, S, S, C] in [-1, 1],
    'label': int32 [B]} with B = global_batch_size // process_count and
    S = data_config.image_size; labels are zeros if the data set has none.
    With data.low_res_size = s > 0, also 'low_res': float32 [B, s, s, C]; with
    data.caption_key, also 'caption': bytes [B].
  """
  setup = _setup(data_config, global_batch_size, data_config.train_split,
                 process_index, process_count)
  # Separate seeds for order and flips, and per process, so processes do not
  # flip the same positions of their (different) shards alike.
  shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence(
      [seed, setup.process_index]).generate_state(2))
  ds = grain.MapDataset.source(setup.source)
  ds = ds[setup.process_index::setup.process_count]
  if _fits_in_memory(data_config, len(ds)):
    # Preprocessing is a pure function of the element, so doing it once
    # before the shuffle gives the same stream as doing it every epoch.
    ds = grain.MapDataset.source(list(ds.map(setup.preprocess)))
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
  else:
    ds = ds.shuffle(seed=shuffle_seed).repeat(None).map(setup.preprocess)
  if data_config.random_flip:
    ds = ds.random_map(_RandomFlip(), seed=flip_seed)
  # Batching the index-based dataset makes the iterator state a batch count.
  ds = ds.batch(setup.local_batch, drop_remainder=True).map(_ToFloat())
  it_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if data_config.worker_count > 0:
    # grain's worker processes read absl flags; outside absl.app (tests,
    # notebooks) nothing parsed them, which grain reports as an error.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  identity = {
      "version": _STATE_VERSION, "dataset": setup.builder.info.full_name,
      "split": data_config.train_split, "seed": int(seed),
      "process_count": setup.process_count,
      "local_batch_size": setup.local_batch,
      "image_size": data_config.image_size,
      "random_flip": bool(data_config.random_flip),
      "worker_count": data_config.worker_count,
  }
  if data_config.get("low_res_size", 0):  # only then: older states stay restorable
    identity["low_res_size"] = data_config.low_res_size
  return TrainIterator(iter(it_ds), identity)


class _PaddedShard:
  """One process's shard of a source, padded to `length` with masked copies."""

  def __init__(self, source: Any, indices: np.ndarray, length: int):
    self._source, self._indices, self._length = source, indices, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> dict[str, Any]:
    valid = i < len(self._indices)
    # Padding repeats record 0 so shapes hold; its mask says to ignore it.
    example = self._source[int(self._indices[i]) if valid else 0]
    return {**example, "mask": valid}


def create_eval_iterator(data_config: ml_collections.ConfigDict,
                         batch_size: int, *, split: str | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[Batch]:
  """One in-order pass over a split (eval split by default), padded.

  Process p reads records p, p + process_count, ... Every process yields the
  same number of batches, ceil(ceil(N / process_count) / B), so collective
  eval steps line up; padded entries have mask False.

  Args:
    data_config: the `config.data` section.
    batch_size: global batch, summed over processes.
    split: TFDS split, default `data_config.eval_split`.
    process_index: this process, default `jax.process_index()`.
    process_count: processes, default `jax.process_count()`.

  Returns:
    An iterator of {'image': float32 [B, S, S, C] in [-1, 1], 'label': int32
    [B], 'mask': bool [B]}, B = batch_size // process_count.
  """
  setup = _setup(data_config, batch_size, split or data_config.eval_split,
                 process_index, process_count)
  num = len(setup.source)
  indices = np.arange(num)[setup.process_index::setup.process_count]
  per_process = math.ceil(num / setup.process_count)
  length = math.ceil(per_process / setup.local_batch) * setup.local_batch
  ds = grain.MapDataset.source(_PaddedShard(setup.source, indices, length))
  ds = ds.map(setup.preprocess).batch(setup.local_batch).map(_ToFloat())
  return iter(ds.to_iter_dataset(_READ_OPTIONS))
