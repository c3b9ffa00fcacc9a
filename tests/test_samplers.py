"""Samplers against analytic oracles and independent step-by-step references."""
import fractions
import os

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


# ---------------------------------------------------------------------------
# diffusers' conventions (timestep_spacing, ddim_eps, x_T) against
# tests/data/diffusers_schedulers.npz (tests/data/make_scheduler_reference.py:
# diffusers' DDIMScheduler and DDPMScheduler on a toy eps model, 10 of 1000 steps).

REF_PATH = os.path.join(os.path.dirname(__file__), "data", "diffusers_schedulers.npz")
SPACINGS = ("linspace", "leading", "trailing")
DDIM_CASES = {"clip_raw": ("static", "raw"), "clip_clipped": ("static", "clipped"),
              "noclip": ("none", "raw")}


@pytest.fixture(scope="module")
def ref():
  with np.load(REF_PATH) as f:
    return dict(f)


def _toy_eps(x, t):
  """The reference script's `toy_eps`: tanh(x) (0.3 + 0.5 t / 1000) + 0.1 sin(3x)."""
  coef = 0.3 + 0.5 * t.astype(jnp.float32) / 1000.0
  return jnp.tanh(x) * coef.reshape((-1,) + (1,) * (x.ndim - 1)) + 0.1 * jnp.sin(3.0 * x)


def _with_abar(abar):
  """LINEAR with its alpha-bar replaced by `abar` (diffusers' float32 one); the
  samplers read only alphas_cumprod."""
  return LINEAR.replace(alphas_cumprod=jnp.asarray(abar, jnp.float32))


def _rel_err(got, want):
  """max |got - want| / max(1, |want|): values reach 400 without clipping."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))


def test_diffusers_schedule_is_the_linear_one_in_float32(ref):
  """diffusers builds alpha-bar by a float32 cumprod; ours is the float64 one rounded
  (0 ulps off). Theirs is up to 6 ulps off (measured 2.5e-7, 3.6e-7 relative), which
  is 2.7e-4 relative in 1 - alpha-bar at t = 1 (where it is 3e-4)."""
  ours = np.asarray(LINEAR.alphas_cumprod, np.float64)
  theirs = ref["alphas_cumprod"].astype(np.float64)
  exact = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_array_equal(ours, exact.astype(np.float32))
  assert np.max(np.abs(theirs - exact) / exact) < 1e-6
  assert np.max(np.abs(theirs - ours) / (1 - exact)) < 5e-4


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("method,kind", [("ddim", "ddim_{}_clip_raw"),
                                         ("ancestral", "ddpm_{}_fixed_small")])
def test_step_timesteps_match_diffusers(ref, spacing, method, kind):
  """Timesteps visited and where each step goes: DDIM to t - T // n (off the grid for
  "linspace": 999 -> 899), DDPMScheduler to the next timestep visited."""
  name = kind.format(spacing)
  t, t_prev = samplers.step_timesteps(1000, 10, spacing, method)
  np.testing.assert_array_equal(t, ref[f"{name}_t"])
  np.testing.assert_array_equal(t_prev, ref[f"{name}_t_prev"])
  abar = np.append(ref["alphas_cumprod"], 1.0).astype(np.float32)
  np.testing.assert_array_equal(abar[t], ref[f"{name}_abar"])
  np.testing.assert_array_equal(abar[t_prev], ref[f"{name}_abar_prev"])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_matches_diffusers(ref, monkeypatch, spacing, case):
  """DDIMScheduler, eta 0, from the recorded x_T: every step's x0 and the final sample,
  on diffusers' float32 alpha-bar and on ours. Both differ by float32 rounding only
  (measured: at most 3.7e-6, relative where |x| > 1, as without clipping |x| reaches
  400; finals at most 1.1e-6)."""
  # At eta 0 diffusers draws no noise and ours is multiplied by sigma = 0: zeros
  # instead change nothing but spare compiling the random-number generator.
  monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype=None: jnp.zeros(shape))
  thresholding, ddim_eps = DDIM_CASES[case]
  name = f"ddim_{spacing}_{case}"
  draw = jax.jit(lambda sched: samplers.sample(
      _toy_eps, sched, ref["x_T"].shape, jax.random.key(0), method="ddim", num_steps=10,
      thresholding=thresholding, timestep_spacing=spacing, ddim_eps=ddim_eps,
      x_T=ref["x_T"], return_trajectory=True))
  for sched in (_with_abar(ref["alphas_cumprod"]), LINEAR):
    x, traj = draw(sched)
    assert _rel_err(traj, ref[f"{name}_x0"]) < 2e-5
    assert _rel_err(x, ref[f"{name}_x"][-1]) < 2e-5


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ancestral_matches_diffusers_ddpm(ref, monkeypatch, spacing, variance):
  """DDPMScheduler with clip_sample, its noise replaced by a fixed array on both sides,
  so every step is its mean plus its standard deviation times that array where it
  adds noise (t > 0: also on trailing's last step, from t = 99). Measured: at most
  5.5e-6 (x0 of a step), 3.6e-7 (final samples)."""
  noise = jnp.asarray(ref["ddpm_noise"])
  monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype=None: noise)
  name = f"ddpm_{spacing}_{variance}"
  x, traj = samplers.sample(_toy_eps, _with_abar(ref["alphas_cumprod"]), noise.shape,
                            jax.random.key(0), method="ancestral", num_steps=10,
                            variance=variance, timestep_spacing=spacing, x_T=ref["x_T"],
                            return_trajectory=True)
  assert _rel_err(traj, ref[f"{name}_x0"]) < 2e-5
  assert _rel_err(x, ref[f"{name}_x"][-1]) < 2e-5
  added_last = spacing == "trailing" and variance == "fixed_large"
  assert (np.max(np.abs(np.asarray(x - traj[-1]))) > 0.1) == added_last


def test_uniform_spacing_is_the_default_grid():
  """"uniform" (the default) steps between points of spaced_timesteps; "linspace"
  visits the same points, but its DDIM steps to t - T // n."""
  t, t_prev = samplers.step_timesteps(1000, 10)
  np.testing.assert_array_equal(t, samplers.spaced_timesteps(1000, 10)[::-1])
  np.testing.assert_array_equal(t_prev, np.append(t[1:], -1))
  t_lin, prev_lin = samplers.step_timesteps(1000, 10, "linspace", "ddim")
  np.testing.assert_array_equal(t_lin, t)
  assert prev_lin[0] == 899 and t_prev[0] == 888
  for method in ("ancestral", "ddim"):
    np.testing.assert_array_equal(samplers.step_timesteps(1000, 10, "uniform", method)[1],
                                  t_prev)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_defaults_unchanged(gaussian_fn, method):
  """Passing the defaults explicitly, or x_T as the sampler would draw it, changes
  nothing, bit for bit; the defaults match test_ddim_matches_numpy_reference and
  test_respaced_ancestral_equals_loop_on_recomputed_betas."""
  rng, shape = jax.random.key(12), (16, 2)
  kw = dict(method=method, num_steps=10, eta=0.5)
  base = samplers.sample(gaussian_fn, LINEAR, shape, rng, **kw)
  x_T = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
  explicit = samplers.sample(gaussian_fn, LINEAR, shape, rng, timestep_spacing="uniform",
                             ddim_eps="clipped", x_T=x_T, **kw)
  np.testing.assert_array_equal(base, explicit)


def test_ddim_eps_raw_differs_only_where_x0_is_clipped(gaussian_fn):
  """Without thresholding, raw and clipped eps are the same eps."""
  kw = dict(method="ddim", num_steps=10, thresholding="none")
  a = samplers.sample(gaussian_fn, LINEAR, (16, 2), jax.random.key(1), **kw)
  b = samplers.sample(gaussian_fn, LINEAR, (16, 2), jax.random.key(1), ddim_eps="raw", **kw)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_diffusers_trailing_artefact_is_an_error():
  """diffusers' trailing grid for 61 of 1000 has 62 timesteps, the last -1."""
  assert len(samplers.diffusers_timesteps(1000, 60, "trailing")) == 60
  with pytest.raises(ValueError, match="62 timesteps ending at -1"):
    samplers.diffusers_timesteps(1000, 61, "trailing")


def test_convention_bad_inputs(gaussian_fn):
  draw = lambda **kw: samplers.sample(gaussian_fn, LINEAR, (2, 1), jax.random.key(0),
                                      num_steps=4, **kw)
  with pytest.raises(ValueError, match="uniform, linspace, leading, trailing"):
    draw(timestep_spacing="even")
  with pytest.raises(ValueError, match="valid values: clipped, raw"):
    draw(method="ddim", ddim_eps="unclipped")
  with pytest.raises(ValueError, match="dpm_solver\\+\\+ steps on its own log-SNR grid"):
    draw(method="dpm_solver++", timestep_spacing="leading")
  with pytest.raises(ValueError, match=r"x_T has shape \(2, 2\), expected \(2, 1\)"):
    draw(x_T=jnp.zeros((2, 2)))
