"""Evaluation maths and the FID Inception: checked against independent references."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from diffusion_jax.evaluation import inception, npz_io, precision_recall, stats


def _frechet_reference(mu1, s1, mu2, s2):
  """d^2 via Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric eigh)."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(
      np.sqrt(np.clip(inner, 0, None)))


def test_frechet_distance_matches_reference_on_random_features():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(600, 16)) @ rng.normal(size=(16, 16))
  b = 0.5 + rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) * 0.7
  sa, sb = stats.feature_statistics(a), stats.feature_statistics(b)
  np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False))
  got = stats.stats_distance(sa, sb)
  np.testing.assert_allclose(got, _frechet_reference(sa.mu, sa.sigma, sb.mu, sb.sigma),
                             rtol=1e-9)
  # The same formula through scipy's sqrtm directly, as pytorch-fid writes it.
  direct = (np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma + sb.sigma)
            - 2 * np.trace(scipy.linalg.sqrtm(sa.sigma @ sb.sigma).real))
  np.testing.assert_allclose(got, direct, rtol=1e-9)
  # 1-D closed form: (m1 - m2)^2 + (s1 - s2)^2.
  assert stats.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  s = stats.feature_statistics(rng.normal(size=(300, 32)))
  assert abs(stats.stats_distance(s, s)) < 1e-9 * np.trace(s.sigma)


def test_fewer_samples_than_dimensions_warns_and_stays_finite():
  rng = np.random.default_rng(2)
  with pytest.warns(stats.NotComparableWarning, match="NOT comparable"):
    small = stats.feature_statistics(rng.normal(size=(20, 64)))
  big = stats.feature_statistics(rng.normal(size=(500, 64)))
  assert np.isfinite(stats.stats_distance(small, big))
  with pytest.raises(ValueError, match="same feature network"):
    stats.frechet_distance(small.mu, small.sigma, big.mu[:10], big.sigma[:10, :10])


def test_inception_score_uniform_is_one_and_confident_spread_is_num_classes():
  mean, std = stats.inception_score(np.zeros((1000, 1008)))
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
  logits = 1e3 * np.eye(10)[np.arange(1000) % 10]  # every split holds all 10 classes
  mean, std = stats.inception_score(logits)
  assert mean == pytest.approx(10.0, rel=1e-9) and std < 1e-9
  # All samples confidently the same class: no diversity, score 1.
  assert stats.inception_score(1e3 * np.eye(10)[np.zeros(100, int)])[0] == pytest.approx(1.0)


def _ref_inception_score(logits, slices):
  """float64 from the definition: per part, exp(mean_x KL(p(y|x) || p(y))) with p(y)
  the part's own marginal; then mean and (population) std over the parts."""
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for lo, hi in slices:
    part = p[lo:hi]
    marginal = part.sum(axis=0) / len(part)
    kl = [sum(q[c] * math.log(q[c] / marginal[c]) for c in range(len(q))) for q in part]
    scores.append(math.exp(sum(kl) / len(kl)))
  mean = sum(scores) / len(scores)
  return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def test_inception_score_matches_definition_on_unbalanced_unequal_splits():
  """Reference: _ref_inception_score with the documented slices
  [i N / splits, (i + 1) N / splits) (N = 23, 5 splits: sizes 4, 5, 4, 5, 5)."""
  rng = np.random.default_rng(3)
  n, c, splits = 23, 6, 5
  logits = 2.0 * rng.normal(size=(n, c))
  logits[:9, 0] += 3.0  # the first parts lean to class 0, the last ones to class 4
  logits[13:, 4] += 2.5
  logits += np.linspace(0, 1, c)  # an unbalanced prior over classes
  slices = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
  assert [hi - lo for lo, hi in slices] == [4, 5, 4, 5, 5]
  mean, std = stats.inception_score(logits, splits=splits)
  ref_mean, ref_std = _ref_inception_score(logits, slices)
  assert mean == pytest.approx(ref_mean, rel=1e-10)
  assert std == pytest.approx(ref_std, rel=1e-10)
  # The data tell plausible mistakes apart: the marginal of all the data instead of
  # each part's, numpy's array_split slicing (sizes 5, 5, 5, 4, 4), ddof = 1.
  whole = _ref_inception_score(logits, [(0, n)])[0]
  all_marginal = []
  for lo, hi in slices:
    p = np.exp(logits - scipy.special.logsumexp(logits, axis=1, keepdims=True))
    kl = np.sum(p[lo:hi] * (np.log(p[lo:hi]) - np.log(p.mean(axis=0))), axis=1)
    all_marginal.append(np.exp(kl.mean()))
  bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), splits)])
  array_split = _ref_inception_score(logits, list(zip(bounds[:-1], bounds[1:])))
  for wrong in (np.mean(all_marginal), array_split[0], whole):
    assert abs(wrong - ref_mean) > 1e-3 * ref_mean
  assert abs(array_split[1] - ref_std) > 1e-3 * ref_std
  assert abs(np.std(all_marginal) - ref_std) > 1e-3 * ref_std
  ddof1 = ref_std * math.sqrt(splits / (splits - 1))
  assert abs(ddof1 - std) > 1e-2 * std


def test_feature_statistics_against_explicit_sums():
  """Reference: mu = sum x / N and S = sum (x - mu)(x - mu)^T / (N - 1), as loops."""
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(7, 3)) * [1.0, 3.0, 0.2] + [5.0, -2.0, 0.5]).astype(np.float32)
  got = stats.feature_statistics(x)
  xs = x.astype(np.float64)
  mu = sum(xs[i] for i in range(7)) / 7
  sigma = sum(np.outer(xs[i] - mu, xs[i] - mu) for i in range(7)) / (7 - 1)
  assert got.num_examples == 7 and got.mu.dtype == np.float64 and got.sigma.dtype == np.float64
  np.testing.assert_allclose(got.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(got.sigma, sigma, rtol=1e-12, atol=1e-14)
  assert not np.allclose(got.sigma, sigma * 6 / 7, rtol=1e-3)  # not the biased N form


class _SqrtmRecorder:
  """Wraps scipy.linalg.sqrtm: records each argument, and returns NaNs from the
  first `fail` calls, as scipy versions whose Schur algorithm divides by zero on a
  singular product do (scipy 1.17 returns finite roots of PSD products)."""

  def __init__(self, fail):
    self.fail, self.args = fail, []

  def __call__(self, a):
    self.args.append(np.array(a))
    if len(self.args) <= self.fail:
      return np.full(a.shape, np.nan)
    return scipy.linalg.sqrtm(a)


def _patch_sqrtm(monkeypatch, recorder):
  import types  # pylint: disable=g-import-not-at-top
  fake = types.SimpleNamespace(linalg=types.SimpleNamespace(sqrtm=recorder),
                               special=scipy.special)
  monkeypatch.setattr(stats, "scipy", fake)


def _commuting(l1, l2, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(l1), len(l1))))
  s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
  return (s1 + s1.T) / 2, (s2 + s2.T) / 2


def test_frechet_distance_ridge_fallback_closed_form(monkeypatch):
  """Reference: for commuting S1 = Q diag(l1) Q^T, S2 = Q diag(l2) Q^T,
  Tr((S1 S2)^1/2) = sum sqrt(l1 l2); with the ridge eps on both diagonals it is
  sum sqrt((l1 + eps)(l2 + eps)) (the traces of S1, S2 themselves stay un-ridged)."""
  l1 = np.array([4.0, 1.5, 0.0, 0.0, 0.3])  # rank-deficient, and the product more so
  l2 = np.array([1.0, 0.0, 2.0, 0.0, 0.7])
  s1, s2 = _commuting(l1, l2)
  mu1, mu2 = np.array([0.1, -0.3, 0.0, 1.0, 0.2]), np.zeros(5)
  dmu = float(np.sum((mu1 - mu2) ** 2))
  exact = dmu + l1.sum() + l2.sum() - 2 * np.sum(np.sqrt(l1 * l2))
  # Without a failing root, no ridge: the exact closed form.
  rec = _SqrtmRecorder(fail=0)
  _patch_sqrtm(monkeypatch, rec)
  assert stats.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-7)
  assert len(rec.args) == 1
  # A non-finite root: the fallback adds eps to both diagonals and retries once.
  for eps in (1e-6, 1e-2):
    rec = _SqrtmRecorder(fail=1)
    _patch_sqrtm(monkeypatch, rec)
    got = stats.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(rec.args) == 2  # the fallback was taken
    np.testing.assert_allclose(rec.args[1], (s1 + eps * np.eye(5)) @ (s2 + eps * np.eye(5)),
                               rtol=1e-12, atol=1e-15)
    ridged = dmu + l1.sum() + l2.sum() - 2 * np.sum(np.sqrt((l1 + eps) * (l2 + eps)))
    assert got == pytest.approx(ridged, rel=1e-7, abs=1e-9)
    # sqrt(eps * l) terms make the ridge visible: 2 sqrt(eps) (sqrt 1.5 + sqrt 2) at least.
    assert abs(ridged - exact) > 2 * math.sqrt(eps)
  # Diagonal singular covariances, fallback forced: the same closed form.
  rec = _SqrtmRecorder(fail=1)
  _patch_sqrtm(monkeypatch, rec)
  got = stats.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2), eps=1e-4)
  ridged = dmu + l1.sum() + l2.sum() - 2 * np.sum(np.sqrt((l1 + 1e-4) * (l2 + 1e-4)))
  assert len(rec.args) == 2 and got == pytest.approx(ridged, rel=1e-9)


def test_precision_recall_on_constructed_sets():
  line = lambda xs: np.stack([np.asarray(xs, float), np.zeros(len(xs))], axis=1)
  real = line(range(10))  # 0..9; k=3 radii: 3 at the ends, 2 inside
  # Half the generated points sit on real ones, half far away: precision 1/2.
  # Generated radii: 0 and 4 have 3, so the ball around 4 reaches 7: recall 8/10.
  gen = line([0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004])
  assert precision_recall.precision_recall(real, gen, k=3) == {"precision": 0.5,
                                                                "recall": 0.8}
  assert precision_recall.precision_recall(real, real, k=3) == {"precision": 1.0,
                                                                 "recall": 1.0}
  assert precision_recall.precision_recall(real, real + 100, k=3) == {"precision": 0.0,
                                                                       "recall": 0.0}
  np.testing.assert_array_equal(precision_recall.knn_radii(real, 3, block_size=4),
                                [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])  # squared


def test_samples_npz_round_trip_and_bad_layouts(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  path = npz_io.write_samples(str(tmp_path / "s"), images, labels=np.arange(5))
  with np.load(path) as f:  # the layout other suites read
    assert f.files == ["arr_0", "labels"] and f["arr_0"].dtype == np.uint8
  got, labels = npz_io.read_samples(path)
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(labels, np.arange(5))
  with pytest.raises(ValueError, match="uint8"):
    npz_io.write_samples(str(tmp_path / "f"), images.astype(np.float32) / 255)
  with pytest.raises(ValueError, match="NCHW"):
    npz_io.write_samples(str(tmp_path / "c"), images.transpose(0, 3, 1, 2))
  np.savez(tmp_path / "other.npz", images=images)
  with pytest.raises(ValueError, match="no 'arr_0'"):
    npz_io.read_samples(str(tmp_path / "other.npz"))


def test_statistics_file_round_trip_and_foreign_files(tmp_path):
  s = stats.feature_statistics(np.random.default_rng(0).normal(size=(50, 4)))
  path = str(tmp_path / "ref.npz")
  stats.save_stats(path, s, {"split": "train"}, features=np.ones((3, 4)))
  got, meta, feats = stats.load_stats(path)
  np.testing.assert_array_equal(got.sigma, s.sigma)
  assert got.num_examples == 50 and meta == {"split": "train"} and feats.shape == (3, 4)
  np.savez(tmp_path / "pytorch_fid.npz", mu=s.mu, sigma=s.sigma)  # pytorch-fid's layout
  got, meta, feats = stats.load_stats(str(tmp_path / "pytorch_fid.npz"))
  assert got.num_examples == -1 and meta == {} and feats is None
  with pytest.raises(FileNotFoundError, match="fid_reference"):
    stats.load_stats(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------
# The FID Inception.


def random_inception_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Arrays of the weights file's exact layout, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in inception.expected_layout().items():
    if key.endswith("conv.weight"):
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("running_var") or key.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = rng.normal(size=shape) * 0.1
    out[key] = value.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  np.savez(path, **random_inception_weights())
  return path


def test_inception_layout_is_pytorch_fids():
  layout = inception.expected_layout()
  # 94 conv+BN blocks x 5 arrays + fc weight and bias; 23.9M values.
  assert len(layout) == 472
  assert sum(int(np.prod(s)) for s in layout.values()) == 23_885_392
  assert layout["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)  # OIHW
  assert layout["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert layout["fc.weight"] == (1008, 2048)


def test_basic_conv_matches_a_pytorch_layout_reference():
  """Conv (OIHW weights, explicit padding) + batch norm + ReLU, written out in numpy."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  w = rng.normal(size=(4, 3, 1, 3)).astype(np.float32)  # O, I, kh, kw
  bn = {k: rng.uniform(0.5, 1.5, 4).astype(np.float32) for k in
        ("weight", "bias", "running_mean", "running_var")}
  params = {"conv_weight": np.transpose(w, (2, 3, 1, 0)),
            **{f"bn_{k}": v for k, v in bn.items()}}
  got = inception.BasicConv(4, (1, 3), padding=(0, 1)).apply({"params": params},
                                                             jnp.asarray(x))
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  conv = np.zeros((2, 5, 6, 4))
  for j in range(6):
    conv[:, :, j] = np.einsum("bhki,oik->bho", xp[:, :, j:j + 3], w[:, :, 0])
  ref = (conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"]
  np.testing.assert_allclose(got, np.maximum(ref + bn["bias"], 0), rtol=1e-4, atol=1e-5)


def test_fid_pooling_patches():
  """TF's 3x3 average pool ignores the zero padding (pytorch-fid's FID patch)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.full((1, 3, 3, 1), -2.0)
  np.testing.assert_allclose(inception._avg_pool_same(x), -2.0)  # not -2 * 4/9 at corners
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  np.testing.assert_allclose(inception._avg_pool_same(x)[0, 0, 0, 0], (0 + 1 + 3 + 4) / 4)


def test_inception_loads_weights_and_runs(weights_file):
  # 75 x 75 is the smallest input the graph takes: the full network, 16x cheaper than 299.
  net = inception.InceptionFeatures(weights_file, batch_size=4, input_size=75)
  gray = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
  pool3, logits = net(gray)
  assert pool3.shape == (5, 2048) and logits.shape == (5, 1008)
  assert np.isfinite(pool3).all() and np.isfinite(logits).all() and pool3.std() > 0
  rgb_pool3, _ = net(np.repeat(gray, 3, axis=-1))  # grayscale is fed as RGB
  np.testing.assert_allclose(pool3, rgb_pool3, rtol=1e-5, atol=1e-6)
  assert len(net.describe()["weights_sha256"]) == 64


def test_inception_rejects_wrong_weights_files(tmp_path, weights_file):
  arrays = random_inception_weights()
  del arrays["Mixed_6b.branch7x7_2.conv.weight"]
  arrays["fc.weight"] = arrays["fc.weight"][:1000]
  arrays["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  np.savez(tmp_path / "wrong.npz", **arrays)
  with pytest.raises(ValueError) as err:
    inception.load_params(str(tmp_path / "wrong.npz"))
  message = str(err.value)
  assert "1 missing: Mixed_6b.branch7x7_2.conv.weight" in message
  assert "1 unexpected: AuxLogits.fc.weight" in message
  assert "fc.weight: file (1000, 2048), expected (1008, 2048)" in message
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    inception.load_params(str(tmp_path / "absent.npz"))
  (tmp_path / "w.pth").write_bytes(b"")
  with pytest.raises(ValueError, match="convert_inception_weights"):
    inception.load_params(str(tmp_path / "w.pth"))
