"""Improved precision and recall (Kynkaanniemi et al. 2019, NeurIPS).

Each set of features approximates its manifold by the union of balls around
its points, each ball's radius being the distance to the point's k-th nearest
neighbour in its own set (k = 3 in the paper):

  precision = fraction of generated samples inside the real manifold,
  recall    = fraction of real samples inside the generated manifold.

A point lies inside when its distance to some centre is <= that centre's
radius, as in the authors' code. Distances are Euclidean, computed in float64
in row blocks so memory stays at block_size x N.
"""
from __future__ import annotations

import numpy as np


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[A, D], [B, D] -> [A, B] squared Euclidean distances (clipped at 0)."""
  d = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, block_size: int = 1000) -> np.ndarray:
  """Squared distance of each point to its k-th nearest other point: [N].

  Args:
    features: [N, D], N > k.
    k: neighbourhood size (the point itself is not counted).
    block_size: rows per distance block.
  """
  features = np.asarray(features, np.float64)
  n = features.shape[0]
  if k < 1:
    raise ValueError(f"k must be >= 1 (the neighbourhood size), got {k}.")
  if n <= k:
    raise ValueError(f"Need more than k={k} points for k-NN radii, got {n}.")
  radii = np.empty(n)
  for start in range(0, n, block_size):
    d = _squared_distances(features[start:start + block_size], features)
    # Column k of the sorted row: index 0 is the point itself (distance 0).
    radii[start:start + block_size] = np.partition(d, k, axis=1)[:, k]
  return radii


def _fraction_covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                      block_size: int) -> float:
  """Fraction of `points` within radius of at least one centre."""
  inside = np.zeros(points.shape[0], bool)
  for start in range(0, points.shape[0], block_size):
    d = _squared_distances(points[start:start + block_size], centres)
    inside[start:start + block_size] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3,
                     block_size: int = 1000) -> dict[str, float]:
  """Improved precision and recall of `generated` against `real`.

  Args:
    real: [N_r, D] features of real images.
    generated: [N_g, D] features of generated images (same network).
    k: neighbourhood size for the manifold radii.
    block_size: rows per distance block.

  Returns:
    {"precision": float in [0, 1], "recall": float in [0, 1]}.
  """
  real = np.asarray(real, np.float64)
  generated = np.asarray(generated, np.float64)
  if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
    raise ValueError(f"Features must be [N, D] with the same D, got {real.shape} and "
                     f"{generated.shape}.")
  for name, features in (("real", real), ("generated", generated)):
    if k >= 1 and len(features) <= k:
      raise ValueError(f"Precision/recall with k={k} needs more than {k} {name} features "
                       f"(each one's k-th nearest neighbour among the others), got "
                       f"{len(features)}.")
  real_radii = knn_radii(real, k, block_size)
  gen_radii = knn_radii(generated, k, block_size)
  return {"precision": _fraction_covered(generated, real, real_radii, block_size),
          "recall": _fraction_covered(real, generated, gen_radii, block_size)}
