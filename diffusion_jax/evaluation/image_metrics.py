"""Full-reference image metrics for super-resolution: PSNR and SSIM (float64, numpy).

Both compare uint8 images [N, H, W, C] (0..255) pairwise and return one value
per image; callers average over images.

SSIM is Wang et al. (2004) as most super-resolution papers and scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)` compute it: local means,
variances and covariance under a Gaussian window (sigma 1.5, truncated at 3.5
sigma, i.e. 11 taps), K1 = 0.01, K2 = 0.03, averaged over the pixels whose
window lies inside the image, then over channels.
"""
from __future__ import annotations

import numpy as np

DATA_RANGE = 255.0
_SIGMA, _TRUNCATE, _K1, _K2 = 1.5, 3.5, 0.01, 0.03


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"Expected two [N, H, W, C] arrays of one shape, got {a.shape} and "
                     f"{b.shape}.")
  return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio in dB per image: float64 [N] (inf where equal)."""
  a, b = _check_pair(a, b)
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(DATA_RANGE**2 / mse)


def _gaussian_window() -> np.ndarray:
  radius = int(_TRUNCATE * _SIGMA + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / _SIGMA) ** 2)
  return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable correlation over H and W keeping only full windows: [N, H-k+1, W-k+1, C]."""
  k = len(w)
  h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(w[i] * x[:, i:i + h] for i in range(k))
  return sum(w[j] * rows[:, :, j:j + wd] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean structural similarity per image: float64 [N] in [-1, 1]."""
  a, b = _check_pair(a, b)
  w = _gaussian_window()
  if min(a.shape[1:3]) < len(w):
    raise ValueError(f"SSIM's {len(w)}x{len(w)} window needs images of at least that size, "
                     f"got {a.shape[1]}x{a.shape[2]}.")
  c1, c2 = (_K1 * DATA_RANGE) ** 2, (_K2 * DATA_RANGE) ** 2
  mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
  var_a = _filter_valid(a * a, w) - mu_a**2
  var_b = _filter_valid(b * b, w) - mu_b**2
  cov = _filter_valid(a * b, w) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))
