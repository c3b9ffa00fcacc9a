"""The variational bound against an independent float64 numpy evaluation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import likelihood, schedules
from tests import oracles

M, S = 0.1, 0.4


def _quantised_gaussian(shape, seed=0):
  x = np.random.RandomState(seed).randn(*shape) * S + M
  return np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1


def _ref_decoder_ll(x, mean, log_scale):
  s = np.exp(log_scale)
  hi = np.where(x > 0.999, 1.0, stats.norm.cdf((x + 1 / 255 - mean) / s))
  lo = np.where(x < -0.999, 0.0, stats.norm.cdf((x - 1 / 255 - mean) / s))
  return np.log(hi - lo)


def _ref_bpd(x0, rng, betas, variance):
  """DDPM's bound in float64 numpy, with the same per-timestep noise draws."""
  T = len(betas)
  abar = np.cumprod(1 - betas)
  prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - prev) / (1 - abar)
  c1, c2 = betas * np.sqrt(prev) / (1 - abar), (1 - prev) * np.sqrt(1 - betas) / (1 - abar)
  model_var = post_var.copy() if variance == "fixed_small" else betas.copy()
  model_var[0] = post_var[1]
  kl = lambda m1, v1, m2, v2: 0.5 * (np.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1)
  axes = tuple(range(1, x0.ndim))
  total = kl(np.sqrt(abar[-1]) * x0, 1 - abar[-1], 0.0, 1.0).sum(axes)
  for i in range(T):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x0.shape), np.float64)
    xt = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * noise
    eps = oracles.gaussian_eps_np(abar[i], xt, M, S)
    x0_hat = (xt - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    model_mean = c1[i] * x0_hat + c2[i] * xt
    if i == 0:
      total -= _ref_decoder_ll(x0, model_mean, 0.5 * np.log(model_var[0])).sum(axes)
    else:
      true_mean = c1[i] * x0 + c2[i] * xt
      total += kl(true_mean, post_var[i], model_mean, model_var[i]).sum(axes)
  return total / (math.prod(x0.shape[1:]) * math.log(2))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_bits_per_dim_matches_numpy_reference(variance):
  sched = schedules.make_schedule("linear", 1000)
  x0 = _quantised_gaussian((6, 4, 4, 1))
  rng = jax.random.key(3)
  fn = oracles.gaussian_eps(sched, M, S)
  got = jax.jit(lambda x, r: likelihood.bits_per_dim(fn, sched, x, r, variance=variance))(
      jnp.asarray(x0, jnp.float32), rng)
  ref = _ref_bpd(x0, rng, np.linspace(1e-4, 0.02, 1000), variance)
  np.testing.assert_allclose(got, ref, rtol=2e-4)
  # Sanity: the bound is above the entropy of the quantised Gaussian (7.7 bits).
  assert np.all(np.asarray(got).mean() > 7.0)


def test_chunk_size_does_not_change_the_bound():
  sched = schedules.make_schedule("cosine", 100)
  fn = oracles.gaussian_eps(sched, M, S)
  x0 = jnp.asarray(_quantised_gaussian((3, 2, 2, 1), seed=1), jnp.float32)
  a = likelihood.bits_per_dim(fn, sched, x0, jax.random.key(0), chunk_size=7)
  b = likelihood.bits_per_dim(fn, sched, x0, jax.random.key(0), chunk_size=100)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  terms = likelihood.vb_terms(fn, sched, x0, jax.random.key(0), chunk_size=7)
  assert terms.shape == (3, 100) and np.all(np.isfinite(terms))


def test_decoder_likelihood_against_scipy():
  x = np.array([-1.0, -1 + 2 / 255, 0.0, 1 - 2 / 255, 1.0])
  for mean, log_scale in ((0.0, np.log(0.01)), (0.3, np.log(0.2)), (-0.99, np.log(0.003))):
    got = likelihood.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32), mean, log_scale)
    ref = _ref_decoder_ll(x, mean, log_scale)
    ok = ref > -50  # far tails: float64 cdf differences lose all digits
    np.testing.assert_allclose(np.asarray(got)[ok], ref[ok], rtol=1e-4, atol=1e-5)
  # The probabilities of all 256 bins sum to one.
  grid = jnp.arange(256) / 127.5 - 1
  p = jnp.exp(likelihood.discretized_gaussian_log_likelihood(grid, 0.2, jnp.log(0.3)))
  assert float(p.sum()) == pytest.approx(1.0, abs=1e-4)


def test_normal_kl_closed_form():
  got = likelihood.normal_kl(0.5, np.log(0.2), -0.1, np.log(0.7))
  ref = np.log(np.sqrt(0.7) / np.sqrt(0.2)) + (0.2 + 0.36) / (2 * 0.7) - 0.5
  assert float(got) == pytest.approx(ref, rel=1e-6)


# A short schedule: abar_T = prod(1 - beta) ~ 0.39, so the prior term L_T is
# a large part of the bound (for T = 1000 it is ~1e-4 nats and invisible).
SHORT_BETAS = np.linspace(0.01, 0.2, 8)


def _ref_prior_kl(x0, betas):
  """KL(N(sqrt(abar_T) x0, (1 - abar_T) I) || N(0, I)) in nats, summed, float64."""
  abar = np.prod(1 - betas)
  var = 1 - abar
  per_dim = 0.5 * (var + abar * x0**2 - 1 - np.log(var))
  return per_dim.sum(axis=tuple(range(1, x0.ndim)))


def test_prior_kl_matches_the_closed_form_on_a_short_schedule():
  """Reference: the closed-form Gaussian KL of q(x_T | x_0) from N(0, I), float64."""
  sched = schedules.schedule_from_betas(SHORT_BETAS)
  x0 = _quantised_gaussian((5, 3, 2, 1), seed=4)
  x0[0] = 0.0  # the variance part alone
  x0[1] = 1.0  # a large mean part
  got = np.asarray(likelihood.prior_kl(sched, jnp.asarray(x0, jnp.float32)))
  ref = _ref_prior_kl(x0, SHORT_BETAS)
  assert got.shape == (5,)
  assert ref.min() > 0.05  # large enough that zeros or a wrong abar are visible
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # The off-by-one timestep abar[T-2] gives clearly different numbers.
  wrong = _ref_prior_kl(x0, SHORT_BETAS[:-1])
  assert np.all(np.abs(wrong - ref) > 0.1 * ref)


def _ref_vb_terms(x0, rng, betas, variance, M_, S_):
  """[B, T] float64: column 0 the decoder NLL -log p(x_0 | x_1), column i >= 1
  KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i)), for the Gaussian-data oracle
  with the same documented draws fold_in(rng, i). Written from DDPM's formulas."""
  T = len(betas)
  abar = np.cumprod(1 - betas)
  prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1 - prev) / (1 - abar)
  c1 = betas * np.sqrt(prev) / (1 - abar)
  c2 = (1 - prev) * np.sqrt(1 - betas) / (1 - abar)
  model_var = post_var.copy() if variance == "fixed_small" else betas.copy()
  model_var[0] = post_var[1]
  axes = tuple(range(1, x0.ndim))
  cols = []
  for i in range(T):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x0.shape), np.float64)
    xt = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * noise
    eps = oracles.gaussian_eps_np(abar[i], xt, M_, S_)
    x0_hat = (xt - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    mean = c1[i] * x0_hat + c2[i] * xt
    if i == 0:
      cols.append(-_ref_decoder_ll(x0, mean, 0.5 * np.log(model_var[0])).sum(axes))
    else:
      true_mean = c1[i] * x0 + c2[i] * xt
      v1, v2 = post_var[i], model_var[i]
      kl = 0.5 * (np.log(v2 / v1) + v1 / v2 + (true_mean - mean) ** 2 / v2 - 1)
      cols.append(kl.sum(axes))
  return np.stack(cols, axis=1)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_vb_terms_columns_and_bound_match_float64_reference(variance):
  """Reference: every column of vb_terms, and bits_per_dim with L_T included,
  against the float64 oracle computation above (T = 8, chunk 3, so padding is used).

  The denoiser is the exact-posterior eps of N(0.1, 0.4^2) data, *mis-specified*
  (mean 0.3) so the KL columns are large and differ from column to column."""
  sched = schedules.schedule_from_betas(SHORT_BETAS)
  x0 = _quantised_gaussian((4, 3, 3, 1), seed=5)
  rng = jax.random.key(11)
  fn = oracles.gaussian_eps(sched, 0.3, S)
  x = jnp.asarray(x0, jnp.float32)
  both = jax.jit(lambda x, r: (
      likelihood.vb_terms(fn, sched, x, r, variance=variance, chunk_size=3),
      likelihood.bits_per_dim(fn, sched, x, r, variance=variance, chunk_size=3)))
  got, bpd = map(np.asarray, both(x, rng))
  ref = _ref_vb_terms(x0, rng, SHORT_BETAS, variance, 0.3, S)
  assert got.shape == (4, 8)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-5)
  # The columns differ enough that a swap or a reversal would show.
  assert np.min(np.abs(np.diff(ref.mean(axis=0)))) > 1e-3 * np.abs(ref).max()
  ref_bpd = (_ref_prior_kl(x0, SHORT_BETAS) + ref.sum(axis=1)) / (9 * math.log(2))
  np.testing.assert_allclose(bpd, ref_bpd, rtol=2e-4)
  # Leaving out L_T would be visible here (unlike with T = 1000).
  assert np.all(_ref_prior_kl(x0, SHORT_BETAS) / (9 * math.log(2)) > 1e-2 * ref_bpd)
