"""The Flax FID Inception and FID against pytorch-fid, on recorded outputs (no torch).

`tests/data/inception_fid_torch.npz` was written by
`tests/data/make_inception_reference.py` (torch venv): pytorch-fid's own
`InceptionV3([3])` wrapper (bilinear resize to 299 with align_corners=False,
2x - 1) and its PNG data path, on weights drawn by
`tests/data/inception_random_weights.py` (numpy only; the real weights are
96 MB). Here the same generator writes the weights to an .npz with PyTorch names
and layouts, the project's loader (`inception.InceptionFeatures` ->
`load_params`) reads them, and the features, logits and FID must match.
"""
import importlib.util
import pathlib

import numpy as np
import pytest

from diffusion_jax.evaluation import inception, stats

DATA = pathlib.Path(__file__).parent / "data"
# Error measure: max |Flax - torch| / max |torch| over each recorded array. Measured
# (jax 0.10.2 XLA:CPU vs torch 2.14.1 CPU, both float32): 3.4e-7 on pool3 (values in
# [0, 3.5]), 3.6e-7 on the logits (|x| <= 2.4), 1.5e-6 on the grayscale logits.
# Planted bugs move it by: 7.6e-5 (one first-layer conv weight +0.01, 2% of its
# range), 3.9e-4 (one Mixed_6e weight +0.01), 4.6e-3 (resize with align_corners=True),
# 5.5e-3 (BN eps 1e-5 for 1e-3), 3.9e-2 (average pools counting the padding).
REL_TOL = 1e-5
# FID(A, B) is about 0.67. Measured: the Flax features move it by 1e-7-8e-7 relative
# against pytorch-fid (whose 2048 x 2048 sqrtm of the singular product is itself off
# by 6e-7 from the closed form). The two one-weight bugs above move it by 6.8e-4 and
# 1.9e-4: A and B differ by ~1% of the features' size, so FID amplifies feature errors.
FID_RTOL = 1e-4


def _weights_module():
  """tests/data/inception_random_weights.py (numpy only; tests/data is no package)."""
  spec = importlib.util.spec_from_file_location("inception_random_weights",
                                                DATA / "inception_random_weights.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def recorded():
  with np.load(DATA / "inception_fid_torch.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, recorded):
  """The random weights, written as the converter writes the real ones: (path, sha256)."""
  module = _weights_module()
  arrays = module.random_weights(inception.expected_layout(), int(recorded["seed"]))
  path = str(tmp_path_factory.mktemp("inception_ref") / "inception_fid_random.npz")
  np.savez(path, **arrays)
  return path, module.checksum(arrays)


@pytest.fixture(scope="module")
def flax_outputs(weights, recorded):
  """{"pool3_rgb", "logits_rgb", "pool3_gray", "logits_gray"} through the real loader."""
  net = inception.InceptionFeatures(weights[0], batch_size=8)
  out = {}
  out["pool3_rgb"], out["logits_rgb"] = net(recorded["images_rgb"])  # [8, 32, 32, 3]
  gray_net = inception.InceptionFeatures(weights[0], batch_size=4, params=net.params)
  out["pool3_gray"], out["logits_gray"] = gray_net(recorded["images_gray"])  # [2, 28, 28, 1]
  return out


def _rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _closed_form_fid(a, b):
  """FID of [n, D] feature sets with n << D, without a D x D square root.

  With centred features X_a, X_b and S = X^T X / (n - 1), the non-zero
  eigenvalues of S_a S_b are those of (X_a X_b^T)(X_b X_a^T) / ((n_a - 1)(n_b - 1)),
  so Tr (S_a S_b)^(1/2) is the nuclear norm of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  xa, xb = a - a.mean(0), b - b.mean(0)
  scale = np.sqrt((len(a) - 1) * (len(b) - 1))
  tr_sqrt = np.linalg.svd(xa @ xb.T / scale, compute_uv=False).sum()
  diff = a.mean(0) - b.mean(0)
  return float(diff @ diff + (np.sum(xa**2) / (len(a) - 1)) + (np.sum(xb**2) / (len(b) - 1))
               - 2 * tr_sqrt)


def test_regenerated_weights_are_the_recorded_ones(weights, recorded):
  """Same names, shapes and bits as the state dict pytorch-fid loaded."""
  assert weights[1] == str(recorded["weights_sha256"])


def test_features_and_logits_match_pytorch_fid(flax_outputs, recorded):
  pool3 = recorded["pool3_rgb"]
  # The random weights keep activations in a sane range (a test of the test).
  assert 0.1 < pool3.mean() < 1 and pool3.max() < 10 and np.mean(pool3 == 0) < 0.2
  assert pool3.std(axis=0).mean() > 1e-3  # the images give different features
  for key in ("pool3_rgb", "logits_rgb", "pool3_gray", "logits_gray"):
    assert flax_outputs[key].shape == recorded[key].shape, key
    err = _rel_err(flax_outputs[key], recorded[key])
    assert err <= REL_TOL, f"{key}: max |Flax - torch| / max |torch| = {err:.3g}"


def _span_coordinates(features):
  """[N, D] features -> [N, N - 1] coordinates in an orthonormal basis of their affine span.

  FID depends on features only through differences and their inner products
  (mean differences, covariances, Tr (S_a S_b)^(1/2)), all of which an isometry
  of the span keeps, so FID of the coordinates equals FID of the features; it
  avoids scipy's 2048 x 2048 sqrtm, 15-45 s on this 2-core machine.
  """
  x = np.asarray(features, np.float64)
  x = x - x.mean(axis=0)
  _, singular, vt = np.linalg.svd(x, full_matrices=False)
  assert singular[-2] > 1e-6 * singular[0], singular  # rank N - 1: no direction lost
  return x @ vt[:len(x) - 1].T


def test_fid_matches_pytorch_fid(flax_outputs, recorded):
  """FID(A, B) from the Flax features and stats.py == pytorch-fid's on torch features.

  4 + 4 images give rank-3 covariances: the value is not a comparable FID (stats
  warns), but it is a well-defined function of the features, which
  `_closed_form_fid` computes exactly in the full 2048 dimensions.
  """
  want = float(recorded["fid_ab"])  # pytorch-fid's calculate_fid_given_paths
  assert want > 0.1  # A and B differ: not a comparison of two near-zero values
  torch_pool3, pool3 = recorded["pool3_rgb"], flax_outputs["pool3_rgb"]
  np.testing.assert_allclose(_closed_form_fid(torch_pool3[:4], torch_pool3[4:]), want,
                             rtol=FID_RTOL)
  np.testing.assert_allclose(_closed_form_fid(pool3[:4], pool3[4:]), want, rtol=FID_RTOL)
  z = _span_coordinates(pool3)  # [8, 7]
  with pytest.warns(stats.NotComparableWarning):
    a, b = stats.feature_statistics(z[:4]), stats.feature_statistics(z[4:])
  np.testing.assert_allclose(stats.stats_distance(a, b), want, rtol=FID_RTOL)
