"""Forward process, conversions, posterior and losses against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, schedules
from tests import oracles

SCHED = schedules.make_schedule("linear", 1000)


def abar64(t):
  betas = np.linspace(1e-4, 0.02, 1000)
  return np.cumprod(1 - betas)[t], np.cumprod(1 - betas), betas


def test_q_sample_moments():
  n = 200_000
  x0 = jnp.full((n, 1), 0.7)
  for i in (0, 250, 999):
    t = jnp.full((n,), i, jnp.int32)
    xt = diffusion.q_sample(SCHED, x0, t, jax.random.normal(jax.random.key(i), x0.shape))
    a, _, _ = abar64(i)
    assert float(xt.mean()) == pytest.approx(np.sqrt(a) * 0.7, abs=4 * np.sqrt((1 - a) / n) + 1e-6)
    assert float(xt.var()) == pytest.approx(1 - a, rel=0.01, abs=1e-6)


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_conversions_round_trip(pred):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.uniform(k1, (64, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.randint(k3, (64,), 0, 1000)
  xt = diffusion.q_sample(SCHED, x0, t, eps)
  abar = diffusion.extract(SCHED.alphas_cumprod, t, x0)
  out = {"eps": eps, "x0": x0, "v": diffusion.v_from_eps_x0(abar, eps, x0)}[pred]
  x0_hat, eps_hat = diffusion.model_output_to_x0_eps(abar, xt, out, pred)
  # x0 from eps divides by sqrt(abar), which is ~6e-3 at t = T-1: compare
  # where the conversion is well conditioned, and eps everywhere.
  ok = np.asarray(abar[:, 0]) > 1e-2
  np.testing.assert_allclose(x0_hat[ok], x0[ok], atol=2e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-3)
  # v in float64: v = sqrt(a) eps - sqrt(1-a) x0.
  a = np.asarray(abar, np.float64)
  v64 = np.sqrt(a) * np.asarray(eps, np.float64) - np.sqrt(1 - a) * np.asarray(x0, np.float64)
  np.testing.assert_allclose(diffusion.v_from_eps_x0(abar, eps, x0), v64, atol=1e-6)


def test_posterior_matches_bayes_closed_form():
  rng = np.random.RandomState(0)
  t = np.array([0, 1, 10, 500, 999], np.int32)
  x0 = rng.uniform(-1, 1, (5, 4))
  xt = rng.randn(5, 4)
  mean, var, log_var = diffusion.q_posterior(SCHED, jnp.asarray(x0, jnp.float32),
                                             jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  _, abar, betas = abar64(0)
  for row, i in enumerate(t):
    if i == 0:  # x_{-1} is x_0 itself: zero variance, mean x0
      np.testing.assert_allclose(mean[row], x0[row], atol=1e-6)
      assert float(var[row, 0]) == 0.0
      continue
    ap, alpha = abar[i - 1], 1 - betas[i]
    prec = 1 / (1 - ap) + alpha / betas[i]
    m = (np.sqrt(ap) * x0[row] / (1 - ap) + np.sqrt(alpha) * xt[row] / betas[i]) / prec
    np.testing.assert_allclose(mean[row], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[row], 1 / prec, rtol=1e-5)
    np.testing.assert_allclose(log_var[row], np.log(1 / prec), rtol=1e-5)


def test_p_mean_variance_with_true_eps_is_the_posterior():
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (8, 5), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.arange(1, 9, dtype=jnp.int32) * 100
  xt = diffusion.q_sample(SCHED, x0, t, eps)
  out = diffusion.p_mean_variance(SCHED, eps, xt, t, variance="fixed_small")
  mean, var, _ = diffusion.q_posterior(SCHED, x0, xt, t)
  np.testing.assert_allclose(out["mean"], mean, atol=1e-4)
  np.testing.assert_allclose(out["variance"], var, rtol=1e-6)
  large = diffusion.p_mean_variance(SCHED, eps, xt, t, variance="fixed_large")
  np.testing.assert_allclose(large["variance"][:, 0], SCHED.betas[t], rtol=1e-6)
  # Index 0 of fixed_large uses the posterior variance at index 1 (DDPM code).
  v0, _ = diffusion.model_variance(SCHED, jnp.zeros((1,), jnp.int32), x0[:1], "fixed_large")
  assert float(v0[0, 0]) == pytest.approx(float(SCHED.posterior_variance[1]), rel=1e-6)


def test_clip_denoised_clips_x0():
  xt = jnp.full((2, 3), 5.0)
  t = jnp.array([10, 10])
  out = diffusion.p_mean_variance(SCHED, jnp.zeros_like(xt), xt, t, prediction="eps")
  assert float(out["pred_x0"].max()) == 1.0


def test_eps_loss_equals_analytic_expectation_with_oracle():
  # Optimal predictor for x0 ~ N(m, s^2): E||eps - E[eps|x_t]||^2 = a s^2 / (a s^2 + 1 - a).
  m, s, n = 0.2, 0.5, 100_000
  fn = oracles.gaussian_eps(SCHED, m, s)
  k1, k2 = jax.random.split(jax.random.key(2))
  x0 = m + s * jax.random.normal(k1, (n, 1))
  losses = jax.jit(lambda x, r: diffusion.loss(fn, SCHED, x, r))(x0, k2)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  expected = np.mean(abar * s**2 / (abar * s**2 + 1 - abar))
  # The per-example loss has std ~ expected * sqrt(2); 5 sigma.
  assert float(losses.mean()) == pytest.approx(expected, abs=5 * 1.5 * expected / np.sqrt(n))
  t = jnp.full((n,), 300, jnp.int32)
  at300 = diffusion.loss_at(fn, SCHED, x0, t, jax.random.normal(k2, x0.shape))
  a = abar[300]
  assert float(at300.mean()) == pytest.approx(a * s**2 / (a * s**2 + 1 - a), rel=0.02)


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_min_snr_weights_all_equal_x0_space_weighting(pred):
  # With a model that errs by d in x0 space, each parameterisation's weighted
  # loss must equal min(SNR, gamma) * d^2: the weighting is the same objective.
  k1, k2 = jax.random.split(jax.random.key(3))
  x0 = jax.random.uniform(k1, (16, 2), minval=-1, maxval=1)
  t = jnp.arange(16, dtype=jnp.int32) * 60
  noise = jax.random.normal(k2, x0.shape)
  d = 0.01

  def fn(xt, tt):
    abar = diffusion.extract(SCHED.alphas_cumprod, tt, xt)
    x0_wrong = x0 + d
    eps_wrong = diffusion.eps_from_x0(abar, xt, x0_wrong)
    return {"eps": eps_wrong, "x0": x0_wrong,
            "v": diffusion.v_from_eps_x0(abar, eps_wrong, x0_wrong)}[pred]

  got = diffusion.loss_at(fn, SCHED, x0, t, noise, prediction=pred, weighting="min_snr")
  abar = np.asarray(SCHED.alphas_cumprod[t], np.float64)
  snr = abar / (1 - abar)
  np.testing.assert_allclose(got, np.minimum(snr, 5.0) * d**2, rtol=2e-2)


def test_loss_gradients_are_finite():
  def model(w, x, t):
    return w * x + 0.01 * t[:, None].astype(jnp.float32)

  x0 = jax.random.uniform(jax.random.key(4), (32, 3), minval=-1, maxval=1)
  for pred in ("eps", "x0", "v"):
    g = jax.grad(lambda w: diffusion.loss(lambda x, t: model(w, x, t), SCHED, x0,
                                          jax.random.key(5), prediction=pred,
                                          weighting="min_snr").mean())(0.3)
    assert np.isfinite(float(g)) and float(g) != 0.0


def test_bad_inputs():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="prediction 'epsilon'"):
    diffusion.loss(lambda a, b: a, SCHED, x, jax.random.key(0), prediction="epsilon")
  with pytest.raises(ValueError, match="weighting"):
    diffusion.loss(lambda a, b: a, SCHED, x, jax.random.key(0), weighting="snr")
  with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
    diffusion.q_sample(SCHED, x, jnp.array([0, 1, 2, 1000]), x)
  with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
    diffusion.q_sample(SCHED, x, jnp.array([0, 1]), x)
  with pytest.raises(ValueError, match="integer"):
    diffusion.q_sample(SCHED, x, jnp.zeros((4,)), x)
  with pytest.raises(ValueError, match="Shape mismatch"):
    diffusion.q_sample(SCHED, x, jnp.zeros((4,), jnp.int32), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match="denoise_fn returned shape"):
    diffusion.loss(lambda a, b: a[:, :1], SCHED, x, jax.random.key(0))
  with pytest.raises(ValueError, match="variance"):
    diffusion.p_mean_variance(SCHED, x, x, jnp.zeros((4,), jnp.int32), variance="learned")
