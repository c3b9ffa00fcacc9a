"""Samplers against analytic oracles and independent step-by-step references."""
import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, samplers, schedules
from tests import oracles

LINEAR = schedules.make_schedule("linear", 1000)
MU, SD, N = 0.3, 0.5, 100_000


@pytest.fixture(scope="module")
def gaussian_fn():
  return oracles.gaussian_eps(LINEAR, MU, SD)


def _draw(fn, schedule, shape, seed=0, **kw):
  return jax.jit(lambda r: samplers.sample(fn, schedule, shape, r, **kw))(jax.random.key(seed))


@pytest.mark.parametrize("method,steps,tol", [
    ("ancestral", None, 0.02), ("dpm_solver++", 20, 0.02), ("ddim", 100, 0.05)])
def test_gaussian_oracle_moments(gaussian_fn, method, steps, tol):
  x = np.asarray(_draw(gaussian_fn, LINEAR, (N, 1), method=method, num_steps=steps,
                       clip_denoised=False), np.float64)
  assert abs(x.mean() - MU) <= tol * MU
  assert abs(x.std() - SD) <= tol * SD


def test_mixture_oracle_recovers_both_modes():
  w, m, s = (0.3, 0.7), (-0.5, 0.4), (0.1, 0.15)
  fn = oracles.mixture_eps(LINEAR, w, m, s)
  # 20 DPM-Solver steps widen the narrow modes by about 11% (0.111 vs 0.1);
  # the 1000-step ancestral sampler is within 10%.
  for method, steps, std_tol in (("ancestral", None, 0.1), ("dpm_solver++", 20, 0.15)):
    x = np.asarray(_draw(fn, LINEAR, (20_000, 1), method=method, num_steps=steps), np.float64)[:, 0]
    left = x < -0.05
    assert left.mean() == pytest.approx(0.3, abs=0.02), method
    assert x[left].mean() == pytest.approx(-0.5, abs=0.02), method
    assert x[~left].mean() == pytest.approx(0.4, abs=0.02), method
    assert x[left].std() == pytest.approx(0.1, rel=std_tol), method
    assert x[~left].std() == pytest.approx(0.15, rel=std_tol), method


def _ref_ancestral(fn, betas64, t_orig, shape, rng, variance):
  """Algorithm 2 as a Python loop over p_mean_variance on a float64-built schedule."""
  sched = schedules.schedule_from_betas(betas64)
  init_key, loop_key = jax.random.split(rng)
  keys = jax.random.split(loop_key, len(betas64))
  x = jax.random.normal(init_key, shape)
  for i in reversed(range(len(betas64))):
    t = jnp.full((shape[0],), i, jnp.int32)
    out = diffusion.p_mean_variance(sched, fn(x, jnp.full_like(t, t_orig[i])), x, t,
                                    variance=variance, clip_denoised=True)
    noise = jax.random.normal(keys[i], shape)
    x = out["mean"] + (i > 0) * jnp.sqrt(out["variance"]) * noise
  return x


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_scan_equals_python_loop_full_grid(variance):
  sched = schedules.make_schedule("cosine", 40)
  fn = oracles.gaussian_eps(sched, 0.1, 0.6)
  rng = jax.random.key(7)
  got = samplers.sample(fn, sched, (64, 2), rng, variance=variance)
  betas = np.asarray(sched.betas, np.float64)
  ref = _ref_ancestral(fn, betas, np.arange(40), (64, 2), rng, variance)
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_respaced_ancestral_equals_loop_on_recomputed_betas():
  fn = oracles.gaussian_eps(LINEAR, 0.1, 0.6)
  rng = jax.random.key(8)
  ts = samplers.spaced_timesteps(1000, 25)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[ts]
  betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])  # improved-diffusion's respacing
  got = samplers.sample(fn, LINEAR, (64, 2), rng, num_steps=25)
  ref = _ref_ancestral(fn, betas, ts, (64, 2), rng, "fixed_large")
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_spaced_timesteps():
  np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 1000), np.arange(1000))
  ts = samplers.spaced_timesteps(1000, 10)
  assert ts[0] == 0 and ts[-1] == 999 and len(set(ts)) == 10
  with pytest.raises(ValueError, match="num_steps"):
    samplers.spaced_timesteps(100, 101)


@pytest.mark.parametrize("T,n", [(1000, 50), (1000, 7), (1000, 333), (100, 7), (10, 4),
                                 (6, 3), (997, 13), (50, 49)])
def test_spaced_timesteps_interior_values(T, n):
  """References: improved-diffusion's space_timesteps (Python round of a running
  float sum of the stride (T - 1) / (n - 1)), diffusers' "linspace" spacing
  (np.linspace(0, T - 1, n).round()), and the exact rational k (T - 1) / (n - 1)
  rounded half to even; all three agree on these (T, n)."""
  got = samplers.spaced_timesteps(T, n)
  exact = [round(fractions.Fraction(k * (T - 1), n - 1)) for k in range(n)]
  improved, cur = [], 0.0
  for _ in range(n):
    improved.append(round(cur))
    cur += (T - 1) / (n - 1)
  diffusers = np.linspace(0, T - 1, n).round().astype(int)
  np.testing.assert_array_equal(got, exact)
  np.testing.assert_array_equal(got, improved)
  np.testing.assert_array_equal(got, diffusers)
  assert got.dtype == np.int32


def test_spaced_timesteps_known_values():
  """50 of 1000: diffusers' "linspace" timesteps 999, 979, 958, 938, ..., 41, 20, 0;
  3 of 6 rounds the half-way 2.5 to even, as Python's round does."""
  ts = samplers.spaced_timesteps(1000, 50)
  np.testing.assert_array_equal(ts[::-1][:4], [999, 979, 958, 938])
  np.testing.assert_array_equal(ts[:3], [0, 20, 41])
  np.testing.assert_array_equal(samplers.spaced_timesteps(6, 3), [0, 2, 5])
  np.testing.assert_array_equal(samplers.spaced_timesteps(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(samplers.spaced_timesteps(11, 4), [0, 3, 7, 10])


def _ref_log_snr_timesteps(abar, n):
  """float64: lambda = log(abar / (1 - abar)) / 2, targets uniform from lambda(0) to
  lambda(T-1), each mapped to its nearest timestep; then the documented repair:
  each index at least one above the previous one, and at most T - n + k."""
  T = len(abar)
  lam = 0.5 * np.log(abar / (1 - abar))
  targets = np.linspace(lam[0], lam[-1], n)
  dist = np.abs(lam[None, :] - targets[:, None])
  nearest = dist.argmin(axis=1)
  d = np.sort(dist, axis=1)
  margin = float(np.min(d[:, 1] - d[:, 0]))  # how far from a tie
  out = []
  for k in range(n):
    idx = nearest[k] if not out else max(nearest[k], out[-1] + 1)
    out.append(min(idx, T - n + k))
  return np.array(out), nearest, margin


@pytest.mark.parametrize("name,T,n", [("linear", 1000, 25), ("cosine", 1000, 10),
                                      ("cosine", 50, 40), ("quad", 1000, 100)])
def test_log_snr_timesteps_nearest_to_a_uniform_lambda_grid(name, T, n):
  """Reference: _ref_log_snr_timesteps on the schedule's alpha-bar in float64. The
  first case has no collisions, so every index is the nearest one itself; the others
  push indices up (all three) and cap them (both cosine ones)."""
  sched = schedules.make_schedule(name, T)
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  ref, nearest, margin = _ref_log_snr_timesteps(abar, n)
  assert margin > 1e-5  # no near-ties that float32 could resolve differently
  got = np.asarray(samplers.log_snr_timesteps(sched, n))
  np.testing.assert_array_equal(got, ref)
  if name == "linear":
    np.testing.assert_array_equal(got, nearest)
    # Far from trivially so: a uniform grid in t would differ.
    assert np.sum(got != samplers.spaced_timesteps(T, n)) >= n // 3


def test_ddim_matches_numpy_reference():
  sched = schedules.make_schedule("linear", 200)
  fn = oracles.gaussian_eps(sched, -0.2, 0.4)
  rng, eta, n = jax.random.key(9), 0.5, 20
  got = samplers.sample(fn, sched, (32, 3), rng, method="ddim", num_steps=n, eta=eta,
                        clip_denoised=False)
  init_key, loop_key = jax.random.split(rng)
  keys = jax.random.split(loop_key, n)
  x = np.asarray(jax.random.normal(init_key, (32, 3)), np.float64)
  ts = samplers.spaced_timesteps(200, n)
  abar_all = np.cumprod(1 - np.linspace(5e-4, 0.1, 200))
  for j in reversed(range(n)):
    a = abar_all[ts[j]]
    ap = abar_all[ts[j - 1]] if j > 0 else 1.0
    eps = oracles.gaussian_eps_np(a, x, -0.2, 0.4)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
    z = np.asarray(jax.random.normal(keys[j], x.shape), np.float64)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + sigma * z
  np.testing.assert_allclose(got, x, atol=1e-4)


def test_ddim_eta_one_is_ancestral_with_posterior_variance(gaussian_fn):
  rng = jax.random.key(10)
  a = samplers.sample(gaussian_fn, LINEAR, (128, 2), rng, method="ddim", num_steps=50, eta=1.0)
  b = samplers.sample(gaussian_fn, LINEAR, (128, 2), rng, method="ancestral", num_steps=50,
                      variance="fixed_small")
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_dpm_solver_matches_numpy_reference():
  sched = schedules.make_schedule("cosine", 500)
  fn = oracles.gaussian_eps(sched, 0.25, 0.3)
  n = 12
  rng = jax.random.key(11)
  got = samplers.sample(fn, sched, (16, 4), rng, method="dpm_solver++", num_steps=n,
                        clip_denoised=False)
  ts = np.asarray(samplers.log_snr_timesteps(sched, n))[::-1]
  abar = np.asarray(sched.alphas_cumprod, np.float64)[ts]
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  lam = np.log(alpha / sigma)
  x = np.asarray(jax.random.normal(jax.random.split(rng)[0], (16, 4)), np.float64)
  d_prev = None
  for i in range(n):
    eps = oracles.gaussian_eps_np(abar[i], x, 0.25, 0.3)
    d = (x - sigma[i] * eps) / alpha[i]
    if i == n - 1:
      x = d  # final step to sigma = 0
      break
    h = lam[i + 1] - lam[i]
    if d_prev is None:
      x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d
    else:
      r = (lam[i] - lam[i - 1]) / h
      dd = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
      x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * dd
    d_prev = d
  np.testing.assert_allclose(got, x, atol=2e-4)


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [1000, 50])
def test_log_snr_timesteps_strictly_increasing(name, T):
  sched = schedules.make_schedule(name, T)
  for n in (2, 5, 20, 49, T):
    idx = np.asarray(samplers.log_snr_timesteps(sched, n))
    assert idx[0] == 0 and idx[-1] == T - 1 and len(idx) == n
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_same_rng_same_sample_and_trajectory(gaussian_fn, method):
  kw = dict(method=method, num_steps=10, eta=0.3, return_trajectory=True)
  x1, traj = samplers.sample(gaussian_fn, LINEAR, (8, 2, 2, 1), jax.random.key(1), **kw)
  x2, _ = samplers.sample(gaussian_fn, LINEAR, (8, 2, 2, 1), jax.random.key(1), **kw)
  x3, _ = samplers.sample(gaussian_fn, LINEAR, (8, 2, 2, 1), jax.random.key(2), **kw)
  np.testing.assert_array_equal(x1, x2)
  assert not np.allclose(x1, x3)
  assert traj.shape == (10, 8, 2, 2, 1)
  # The last step lands on the predicted x0 of the last network evaluation.
  np.testing.assert_allclose(traj[-1], x1, atol=1e-6)


def test_compiles_once_per_shape_and_method():
  traces = []

  def fn(x, t):
    traces.append(1)  # runs only while tracing
    return 0.1 * x

  @jax.jit
  def draw(rng, eta, scale):
    return samplers.sample(lambda x, t: scale * fn(x, t), LINEAR, (4, 3), rng,
                           method="ddim", num_steps=10, eta=eta)

  for i, eta in enumerate((0.0, 0.5, 1.0)):
    draw(jax.random.key(i), jnp.float32(eta), jnp.float32(1 + i)).block_until_ready()
  assert len(traces) == 1


def test_bad_inputs(gaussian_fn):
  with pytest.raises(ValueError, match="ancestral, ddim, dpm_solver"):
    samplers.sample(gaussian_fn, LINEAR, (2, 1), jax.random.key(0), method="euler")
  with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
    samplers.sample(gaussian_fn, LINEAR, (2, 1), jax.random.key(0), method="ddim",
                    num_steps=2000)
  with pytest.raises(ValueError, match="prediction"):
    samplers.sample(gaussian_fn, LINEAR, (2, 1), jax.random.key(0), prediction="score")
  with pytest.raises(ValueError, match="shape"):
    samplers.sample(gaussian_fn, LINEAR, (2,), jax.random.key(0))
  with pytest.raises(ValueError, match="dpm_solver"):
    samplers.sample(gaussian_fn, LINEAR, (2, 1), jax.random.key(0), method="dpm_solver++",
                    num_steps=1)
  with pytest.raises(ValueError, match="denoise_fn returned shape"):
    samplers.sample(lambda x, t: x[:, :1], LINEAR, (2, 3), jax.random.key(0), num_steps=2)
