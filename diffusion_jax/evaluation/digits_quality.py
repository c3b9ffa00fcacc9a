"""Offline sample quality on the digits: distances in a digits classifier's feature space.

For generated uint8 [N, 16, 16, 1] digits and the classifier of
`digits_classifier.py` (trained on the real TRAIN split), `digits_quality`
reports:

  frechet_distance        Frechet distance of the samples' 64-d features to those
                          of the real TEST split (300 digits never trained on);
  floor_frechet_distance  the same distance from N real TRAIN digits (N = the
                          number of samples, capped at the 1,497 of the split) to
                          the TEST split, the mean over FLOOR_DRAWS random draws:
                          what real data of the same size scores, the floor to
                          read the first figure against (the estimate's bias
                          grows as N falls, so only a same-N floor is fair);
  frechet_distance_ratio  frechet_distance / floor_frechet_distance (1 = real);
  confident_fraction      fraction of samples whose top class probability > 0.9
                          (real_confident_fraction: the same for the TEST split);
  class_histogram         fraction of samples per predicted class (mode coverage;
                          real_class_histogram: the TEST split's);
  precision, recall       Kynkaanniemi et al. (k=3) against the TEST split, with
                          floor_precision/floor_recall for the same N real TRAIN
                          digits (mean over the same draws);
  class_accuracy          with `labels=`: fraction classified as the requested class;
  per_class               with `labels=`: for each class, its samples' count, class
                          accuracy and Frechet distance to that class's real TRAIN
                          digits (~150 each; the TEST split has too few per class),
                          with floor_frechet_distance: as many of them drawn
                          against the rest (null when fewer than 2 of either).

Distances from samples of different sizes are biased differently; compare
figures computed from the same number of samples. `*_all_train` keys keep the
floor of the whole TRAIN split for reference.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from diffusion_jax.evaluation import npz_io, precision_recall, stats
from diffusion_jax.evaluation.digits_classifier import (NUM_CLASSES, DigitsClassifier,
                                                       load_digits_split)

CONFIDENCE = 0.9
PR_K = 3
# Random same-size draws of real TRAIN digits averaged for the floor; their
# spread is reported too (floor_frechet_distance_std).
FLOOR_DRAWS = 10


def _histogram(probs: np.ndarray) -> list[float]:
  counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
  return [round(float(c) / len(probs), 4) for c in counts]


def _real_reference(clf: DigitsClassifier, data_dir: str) -> dict[str, Any]:
  """Features and floor figures of the real splits (cached on the classifier)."""
  cache = getattr(clf, "_real_reference_cache", {})
  if data_dir not in cache:
    train_x, train_y = load_digits_split(data_dir, "train")
    test_x, _ = load_digits_split(data_dir, "test")
    train_f, test_f = clf.features(train_x), clf.features(test_x)
    test_p = clf.predict_proba(test_x)
    test_stats = stats.feature_statistics(test_f)
    floor_pr = precision_recall.precision_recall(test_f, train_f, k=PR_K)
    cache[data_dir] = dict(
        test_features=test_f, test_stats=test_stats,
        train_features=train_f, train_labels=np.asarray(train_y),
        floor_frechet_distance_all_train=stats.stats_distance(
            stats.feature_statistics(train_f), test_stats),
        floor_precision_all_train=floor_pr["precision"],
        floor_recall_all_train=floor_pr["recall"], same_n_floors={},
        real_confident_fraction=float(np.mean(test_p.max(axis=1) > CONFIDENCE)),
        real_class_histogram=_histogram(test_p),
        num_real_train=len(train_x), num_real_test=len(test_x))
    clf._real_reference_cache = cache  # pylint: disable=protected-access
  return cache[data_dir]


def same_n_floor(real: dict[str, Any], n: int) -> dict[str, Any]:
  """Floor figures of `n` random real TRAIN digits against the TEST split.

  Args:
    real: `_real_reference(...)`.
    n: the number of generated samples; draws take min(n, TRAIN size) digits
      without replacement, from seeds 0 .. FLOOR_DRAWS - 1 (so a given n always
      gets the same floor).

  Returns:
    floor_frechet_distance (mean over draws), its std, floor_precision,
    floor_recall (means) and floor_num_samples.
  """
  train_f = real["train_features"]
  m = min(n, len(train_f))
  if m not in real["same_n_floors"]:
    draws = FLOOR_DRAWS if m < len(train_f) else 1  # all of TRAIN: one draw
    fds, precisions, recalls = [], [], []
    for seed in range(draws):
      idx = np.random.default_rng(seed).choice(len(train_f), m, replace=False)
      feats = train_f[np.sort(idx)]
      fds.append(stats.stats_distance(stats.feature_statistics(feats), real["test_stats"]))
      pr = precision_recall.precision_recall(real["test_features"], feats, k=PR_K)
      precisions.append(pr["precision"])
      recalls.append(pr["recall"])
    real["same_n_floors"][m] = dict(
        floor_frechet_distance=float(np.mean(fds)),
        floor_frechet_distance_std=float(np.std(fds)),
        floor_precision=float(np.mean(precisions)), floor_recall=float(np.mean(recalls)),
        floor_num_samples=m, floor_draws=draws)
  return real["same_n_floors"][m]


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
  floor = same_n_floor(real, len(images))
  fd = stats.stats_distance(gen_stats, real["test_stats"])
  out = {
      "frechet_distance": fd,
      **floor,
      "frechet_distance_ratio": fd / floor["floor_frechet_distance"],
      "confident_fraction": float(np.mean(probs.max(axis=1) > CONFIDENCE)),
      "real_confident_fraction": real["real_confident_fraction"],
      "class_histogram": _histogram(probs),
      "real_class_histogram": real["real_class_histogram"],
      "precision": pr["precision"], "recall": pr["recall"],
      **{k: real[k] for k in ("floor_frechet_distance_all_train",
                              "floor_precision_all_train", "floor_recall_all_train")},
      "num_samples": len(images), "num_real_train": real["num_real_train"],
      "num_real_test": real["num_real_test"], "feature_dim": feats.shape[1],
      "classifier_test_accuracy": clf.test_accuracy,
  }
  note = stats.rank_deficiency_note(len(images), feats.shape[1])
  if floor["floor_num_samples"] < len(images):
    note = ((note + "; ") if note else "") + (
        f"the floor uses all {floor['floor_num_samples']} real TRAIN digits, fewer than "
        f"the {len(images)} samples, so the ratio slightly flatters the samples")
  if note:
    out["warning"] = note
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must be [{len(images)}], got {labels.shape}.")
    out["class_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
    out["per_class"] = per_class(feats, probs, labels, real)
  return out


def per_class(feats: np.ndarray, probs: np.ndarray, labels: np.ndarray,
              real: dict[str, Any]) -> list[dict[str, Any]]:
  """Each class's count, accuracy and Frechet distance to its TRAIN digits.

  The floor of class c: n_c of its TRAIN digits (seeded draw) against its other
  TRAIN digits; the samples' distance is to all of them, so the floor is the
  harder comparison, a guide to the noise at that n, not an exact one.
  """
  out = []
  train_f, train_y = real["train_features"], real["train_labels"]
  for c in range(NUM_CLASSES):
    mine, ref = feats[labels == c], train_f[train_y == c]
    row = {"class": c, "num_samples": int(len(mine)), "num_real": int(len(ref)),
           "class_accuracy": (float(np.mean(probs[labels == c].argmax(axis=1) == c))
                              if len(mine) else None),
           "frechet_distance": None, "floor_frechet_distance": None}
    if len(mine) >= 2 and len(ref) >= 2:
      ref_stats = stats.feature_statistics(ref)
      row["frechet_distance"] = stats.stats_distance(stats.feature_statistics(mine), ref_stats)
      m = min(len(mine), len(ref) - 2)
      if m >= 2:
        idx = np.random.default_rng(c).permutation(len(ref))
        row["floor_frechet_distance"] = stats.stats_distance(
            stats.feature_statistics(ref[idx[:m]]), stats.feature_statistics(ref[idx[m:]]))
    out.append(row)
  return out
