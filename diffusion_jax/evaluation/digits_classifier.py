"""A small deterministic digits classifier: the offline feature network for quality.

FID needs Inception weights from the network; the offline digits default needs a
quality measure that runs anywhere. This is a small MLP trained on the real
`digits` TRAIN split (full batch, Adam, a fixed number of steps from a fixed
seed), whose 64-d penultimate pre-activations serve as features and whose softmax
says which digit a sample looks like. It is trained once and cached as an .npz
beside the data (about 4 s on a 2-core CPU); the cache records the recipe and
is retrained if the recipe changes.

  clf = DigitsClassifier.load_or_train(data_dir)
  clf.test_accuracy                    # on the 300 held-out real digits
  clf.predict_proba(images_uint8)      # [N, 10]
  clf.features(images_uint8)           # [N, 64]
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from diffusion_jax.evaluation import npz_io

FEATURE_DIM = 64
NUM_CLASSES = 10
# Everything that changes the trained weights; a cache with another recipe is
# retrained rather than trusted.
RECIPE = dict(version=2, arch="mlp256-relu-64-relu-10", optimizer="adamw",
              lr=3e-3, weight_decay=1e-4, steps=200, seed=0, full_batch=True)
_INFER_BATCH = 512  # Fixed inference batch: one compile for any N.


class _Net(nn.Module):
  """uint8 [B, 16, 16, 1] -> (features [B, 64], logits [B, 10]).

  An MLP, not a CNN: on XLA:CPU a full-batch step of even a two-conv net took
  190-360 ms against 17 ms for this, at the same test accuracy (98%).
  """

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
    x = nn.relu(nn.Dense(256)(x))
    # Features before the ReLU: after it some units are zero on every digit,
    # which makes the feature covariance singular.
    features = nn.Dense(FEATURE_DIM)(x)
    return features, nn.Dense(NUM_CLASSES)(nn.relu(features))


@functools.lru_cache(maxsize=4)
def load_digits_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The real digits of a split: (uint8 [N, 16, 16, 1], int64 labels [N]).

  Builds the offline data set in `data_dir` if needed ("" = TFDS's default).
  """
  # pylint: disable-next=g-import-not-at-top  (keeps TFDS out of plain imports)
  from diffusion_jax.datasets.prepare import prepare_dataset
  data = ml_collections.ConfigDict(dict(name="digits", data_dir=data_dir, train_split="train"))
  source = prepare_dataset(data).as_data_source(split=split)
  records = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([int(r["label"]) for r in records], np.int64)
  images.setflags(write=False)  # shared through the cache
  labels.setflags(write=False)
  return images, labels


def default_cache_path(data_dir: str) -> str:
  if not data_dir:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = tfds.core.constants.get_default_data_dir()
  return os.path.join(data_dir, "digits_classifier", f"v{RECIPE['version']}.npz")


def _train(train_x: np.ndarray, train_y: np.ndarray) -> dict[str, Any]:
  """Full-batch Adam(W) from RECIPE's seed; returns the params."""
  net = _Net()
  params = net.init(jax.random.key(RECIPE["seed"]), train_x[:1])["params"]
  tx = optax.adamw(RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
  # Arguments, not closed-over constants: XLA would constant-fold the data.
  x, y = jnp.asarray(train_x), jnp.asarray(train_y)

  def loss_fn(p, x, y):
    _, logits = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(RECIPE["steps"]):  # a Python loop: a scan of train steps is slow on CPU
    params, opt_state, loss = step(params, opt_state, x, y)
  logging.info("Digits classifier: final train loss %.4f", float(loss))
  return jax.device_get(params)


class DigitsClassifier:
  """The trained classifier; see the module docstring."""

  def __init__(self, params: dict[str, Any], meta: dict[str, Any]):
    self.params = params
    self.meta = meta
    # NaN only for the moment between training and measuring accuracy.
    self.test_accuracy: float = float(meta.get("test_accuracy", "nan"))
    self.train_accuracy: float = float(meta.get("train_accuracy", "nan"))
    net = _Net()
    self._apply = jax.jit(lambda p, x: net.apply({"params": p}, x))

  @classmethod
  def load_or_train(cls, data_dir: str, cache_path: Optional[str] = None) -> "DigitsClassifier":
    """Loads the cached classifier, or trains it on the digits train split and caches it.

    Args:
      data_dir: TFDS data dir holding (or to hold) `digits`; "" = TFDS default.
      cache_path: .npz to read/write; default `<data_dir>/digits_classifier/v<N>.npz`.
    """
    path = cache_path or default_cache_path(data_dir)
    if os.path.exists(path):
      clf = cls._load(path)
      if clf is not None:
        return clf
    start = time.perf_counter()
    train_x, train_y = load_digits_split(data_dir, "train")
    test_x, test_y = load_digits_split(data_dir, "test")
    clf = cls(_train(train_x, train_y), {})
    meta = dict(recipe=RECIPE, num_train=len(train_x), num_test=len(test_x),
                train_accuracy=clf._accuracy(train_x, train_y),
                test_accuracy=clf._accuracy(test_x, test_y),
                train_seconds=round(time.perf_counter() - start, 1))
    clf = cls(clf.params, meta)
    cls._save(path, clf)
    logging.info("Trained the digits classifier in %.1f s: train accuracy %.4f, test "
                 "accuracy %.4f; cached at %s", meta["train_seconds"], clf.train_accuracy,
                 clf.test_accuracy, path)
    return clf

  @classmethod
  def _load(cls, path: str) -> Optional["DigitsClassifier"]:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["meta"]))
      if meta.get("recipe") != RECIPE:
        logging.warning("Digits classifier cache %s has another recipe; retraining.", path)
        return None
      flat = {tuple(k.split("/")): f[k] for k in f.files if k != "meta"}
    return cls(traverse_util.unflatten_dict(flat), meta)

  @staticmethod
  def _save(path: str, clf: "DigitsClassifier") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"/".join(k): np.asarray(v) for k, v in
              traverse_util.flatten_dict(clf.params).items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(clf.meta, sort_keys=True)), **arrays)
    os.replace(tmp, path)  # concurrent trainers: the last complete file wins

  def _outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = npz_io.check_images(images)
    if images.shape[1:] != (16, 16, 1):
      raise ValueError(f"The digits classifier takes [N, 16, 16, 1], got {images.shape}.")
    feats, logits = [], []
    for start in range(0, len(images), _INFER_BATCH):
      batch = images[start:start + _INFER_BATCH]
      n = len(batch)
      padded = np.concatenate([batch, np.zeros((_INFER_BATCH - n,) + batch.shape[1:],
                                               np.uint8)])
      f, l = self._apply(self.params, padded)
      feats.append(np.asarray(f)[:n])
      logits.append(np.asarray(l)[:n])
    return np.concatenate(feats), np.concatenate(logits)

  def _accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict_proba(images).argmax(1) == labels))

  def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, 16, 16, 1] -> class probabilities float64 [N, 10]."""
    logits = self._outputs(images_uint8)[1].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)

  def features(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, 16, 16, 1] -> penultimate pre-ReLU activations float32 [N, 64]."""
    return self._outputs(images_uint8)[0]
