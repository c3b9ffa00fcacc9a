"""Feature statistics, Frechet distance and Inception Score, in float64 on the host.

FID (Heusel et al. 2017) is the Frechet distance between two Gaussians fitted to
network features of real and generated images:

  d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

It is computed as pytorch-fid and TTUR do (scipy's matrix square root, an `eps`
offset on the diagonals if the product is singular, the imaginary part dropped
when it is numerical noise), but always in float64: in float32 the result is
off by about 1e-4.

Statistics files are `.npz` with `mu` [D] and `sigma` [D, D] (the keys pytorch-fid
and TTUR use, so their reference files load here), plus, when written by us,
`num_examples`, `meta` (a JSON string saying what they were computed from) and
optionally `features` (a subset of the raw features, for precision/recall).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging

from diffusion_jax.evaluation import npz_io


class NotComparableWarning(UserWarning):
  """A metric was computed in a way that makes it incomparable to published ones."""


class FeatureStats(NamedTuple):
  """Gaussian fitted to features: mean float64 [D], covariance float64 [D, D]."""
  mu: np.ndarray
  sigma: np.ndarray
  num_examples: int


def rank_deficiency_note(num_examples: int, dim: int) -> Optional[str]:
  """A warning text when N samples cannot give a full-rank D x D covariance."""
  if num_examples > dim:
    return None
  return (f"only {num_examples} samples for {dim}-dimensional features: the covariance "
          "is rank-deficient, so this Frechet distance is biased and NOT comparable to "
          f"values computed from more samples (use well over {dim}; FID is usually "
          "reported on 50,000)")


def feature_statistics(features: np.ndarray) -> FeatureStats:
  """Mean and (unbiased, N - 1) covariance of features, in float64.

  Args:
    features: [N, D] features of N images.

  Returns:
    FeatureStats; warns (NotComparableWarning) when N <= D.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}.")
  note = rank_deficiency_note(*features.shape)
  if note:
    warnings.warn(note, NotComparableWarning, stacklevel=2)
    logging.warning("%s", note)
  return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False),
                      features.shape[0])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].
    eps: added to both diagonals if sqrtm(sigma1 @ sigma2) is not finite.

  Returns:
    The squared Frechet distance (what papers call FID when the features are
    Inception pool3).

  Raises:
    ValueError: shapes disagree, or the square root has a large imaginary part
      (the covariances are not positive semi-definite).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}. Were both computed with the same "
                     "feature network?")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product (e.g. fewer samples than dimensions) can make the
    # Schur-based square root blow up; a tiny ridge fixes it (as pytorch-fid).
    logging.warning("Frechet distance: sqrtm(sigma1 @ sigma2) is not finite (singular "
                    "product); adding %g to the covariance diagonals.", eps)
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Tiny imaginary parts are round-off from near-zero eigenvalues; large ones
    # mean the inputs are not covariances.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("Frechet distance: the matrix square root has an imaginary "
                       f"component of {np.max(np.abs(covmean.imag)):.3g}; are the "
                       "covariances positive semi-definite?")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
  """frechet_distance of two FeatureStats."""
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016): mean and std over `splits` parts.

  IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the marginal of each part. Parts
  are consecutive slices [i N / splits, (i + 1) N / splits), as in the original
  TensorFlow code.

  Args:
    logits: [N, C] class logits (for the FID Inception, all 1008 outputs).
    splits: number of parts.

  Returns:
    (mean, std) over the parts. Uniform predictions give 1; confident
    predictions spread evenly over C classes give C.
  """
  logits = np.asarray(logits, np.float64)
  if splits < 1:
    raise ValueError(f"splits must be >= 1, got {splits}.")
  if logits.ndim != 2 or logits.shape[0] < splits:
    raise ValueError(f"logits must be [N >= splits={splits}, C], got {logits.shape}: the "
                     "Inception Score needs at least one sample per split.")
  n = logits.shape[0]
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    # log p(y) in log space: a class no sample gives mass would be log(0).
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal[None]), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str, stats: FeatureStats, meta: dict[str, Any],
               features: Optional[np.ndarray] = None) -> None:
  """Writes a statistics file (atomically: a partial file never has the name)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = dict(mu=stats.mu, sigma=stats.sigma, num_examples=np.int64(stats.num_examples),
                meta=np.asarray(json.dumps(meta, sort_keys=True)))
  if features is not None:
    arrays["features"] = np.asarray(features, np.float32)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_stats(path: str) -> tuple[FeatureStats, dict[str, Any], Optional[np.ndarray]]:
  """Reads a statistics file (ours, pytorch-fid's or TTUR's).

  Returns:
    (stats, meta, features); meta is {} and features None where the file has none,
    and num_examples is -1 if unknown.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not an .npz, lacks `mu` or `sigma`, or their shapes
      disagree.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Reference statistics file {path!r} does not exist. Compute "
                            "it with --mode=eval and config.eval.fid_reference='' (it is "
                            "then written to <workdir>/eval/), or point to a pytorch-fid "
                            "or TTUR .npz with 'mu' and 'sigma'.")
  with npz_io.open_npz(path, "reference statistics ('mu' [D], 'sigma' [D, D])") as f:
    missing = {"mu", "sigma"} - set(f.files)
    if missing:
      raise ValueError(f"{path!r} is not a statistics file: it lacks {sorted(missing)} "
                       f"(has {sorted(f.files)}).")
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    num = int(f["num_examples"]) if "num_examples" in f.files else -1
    meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    features = f["features"] if "features" in f.files else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} do not fit.")
  return FeatureStats(mu, sigma, num), meta, features
