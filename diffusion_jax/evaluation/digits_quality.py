"""Offline sample quality on the digits: distances in a digits classifier's feature space.

For generated uint8 [N, 16, 16, 1] digits and the classifier of
`digits_classifier.py` (trained on the real TRAIN split), `digits_quality`
reports:

  frechet_distance        Frechet distance of the samples' 64-d features to those
                          of the real TEST split (300 digits never trained on);
  floor_frechet_distance  the same distance from the real TRAIN split to the TEST
                          split: what real data scores, the floor to read the
                          first figure against;
  confident_fraction      fraction of samples whose top class probability > 0.9
                          (real_confident_fraction: the same for the TEST split);
  class_histogram         fraction of samples per predicted class (mode coverage;
                          real_class_histogram: the TEST split's);
  precision, recall       Kynkaanniemi et al. (k=3) against the TEST split, with
                          floor_precision/floor_recall for TRAIN vs TEST;
  class_accuracy          with `labels=`: fraction classified as the requested class.

Distances from samples of different sizes are biased differently; compare
figures computed from the same number of samples.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from diffusion_jax.evaluation import npz_io, precision_recall, stats
from diffusion_jax.evaluation.digits_classifier import (NUM_CLASSES, DigitsClassifier,
                                                       load_digits_split)

CONFIDENCE = 0.9
PR_K = 3


def _histogram(probs: np.ndarray) -> list[float]:
  counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
  return [round(float(c) / len(probs), 4) for c in counts]


def _real_reference(clf: DigitsClassifier, data_dir: str) -> dict[str, Any]:
  """Features and floor figures of the real splits (cached on the classifier)."""
  cache = getattr(clf, "_real_reference_cache", {})
  if data_dir not in cache:
    train_x, _ = load_digits_split(data_dir, "train")
    test_x, _ = load_digits_split(data_dir, "test")
    train_f, test_f = clf.features(train_x), clf.features(test_x)
    test_p = clf.predict_proba(test_x)
    test_stats = stats.feature_statistics(test_f)
    floor_pr = precision_recall.precision_recall(test_f, train_f, k=PR_K)
    cache[data_dir] = dict(
        test_features=test_f, test_stats=test_stats,
        floor_frechet_distance=stats.stats_distance(stats.feature_statistics(train_f),
                                                    test_stats),
        floor_precision=floor_pr["precision"], floor_recall=floor_pr["recall"],
        real_confident_fraction=float(np.mean(test_p.max(axis=1) > CONFIDENCE)),
        real_class_histogram=_histogram(test_p),
        num_real_train=len(train_x), num_real_test=len(test_x))
    clf._real_reference_cache = cache  # pylint: disable=protected-access
  return cache[data_dir]


def digits_quality(images_uint8: np.ndarray, clf: DigitsClassifier, data_dir: str, *,
                   labels: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Quality figures of generated digits; see the module docstring for each key.

  Args:
    images_uint8: generated uint8 [N, 16, 16, 1], N >= 2 (warns if N <= 64, the
      feature dimension: the distance is then not comparable).
    clf: `DigitsClassifier.load_or_train(data_dir)`.
    data_dir: the TFDS data dir holding the real `digits`.
    labels: optional int [N] classes the samples were conditioned on.

  Returns:
    A JSON-able dict of floats, lists and counts.
  """
  images = npz_io.check_images(images_uint8, "generated digits")
  real = _real_reference(clf, data_dir)
  feats, probs = clf.features(images), clf.predict_proba(images)
  gen_stats = stats.feature_statistics(feats)
  pr = precision_recall.precision_recall(real["test_features"], feats, k=PR_K)
  out = {
      "frechet_distance": stats.stats_distance(gen_stats, real["test_stats"]),
      "floor_frechet_distance": real["floor_frechet_distance"],
      "confident_fraction": float(np.mean(probs.max(axis=1) > CONFIDENCE)),
      "real_confident_fraction": real["real_confident_fraction"],
      "class_histogram": _histogram(probs),
      "real_class_histogram": real["real_class_histogram"],
      "precision": pr["precision"], "recall": pr["recall"],
      "floor_precision": real["floor_precision"], "floor_recall": real["floor_recall"],
      "num_samples": len(images), "num_real_train": real["num_real_train"],
      "num_real_test": real["num_real_test"], "feature_dim": feats.shape[1],
      "classifier_test_accuracy": clf.test_accuracy,
  }
  note = stats.rank_deficiency_note(len(images), feats.shape[1])
  if note:
    out["warning"] = note
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must be [{len(images)}], got {labels.shape}.")
    out["class_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
  return out
