"""Classifier-free guidance, conditioning dropout and thresholding (pure maths)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, guidance, samplers, schedules
from tests import oracles

LINEAR = schedules.make_schedule("linear", 1000)
K = 3  # real classes in the toy models; the null class is index 3


def _toy_model_fn(seed=0):
  """A label-dependent model (x, t, cond) -> out, the same shape as x."""
  w = jax.random.normal(jax.random.key(seed), (K + 1,))
  b = jax.random.normal(jax.random.key(seed + 1), (K + 1,))

  def model_fn(x, t, cond):
    w_l = diffusion.broadcast_to(w[cond["label"]], x)
    b_l = diffusion.broadcast_to(b[cond["label"]], x)
    return jnp.sin(x * w_l) + b_l * diffusion.broadcast_to(t / 1000.0, x)
  return model_fn


def test_drop_labels_rate_and_kept_labels():
  n, p = 200_000, 0.1
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, n), jnp.int32)
  out = np.asarray(guidance.drop_labels(jax.random.key(1), labels, p, 10))
  dropped = out == 10
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs(dropped.mean() - p) < 4 * sigma, dropped.mean()
  np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
  # Independent of the label (the same rate in every class).
  for c in range(10):
    assert abs(dropped[np.asarray(labels) == c].mean() - p) < 4 * np.sqrt(p * (1 - p) / (n / 10))
  assert not np.any(np.asarray(guidance.drop_labels(jax.random.key(1), labels, 0.0, 10)) == 10)


def test_scale_one_is_conditional_and_zero_is_unconditional():
  fn = _toy_model_fn()
  x = jax.random.normal(jax.random.key(2), (6, 4, 4, 1))
  t = jnp.arange(6, dtype=jnp.int32) * 100
  labels = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
  cond = fn(x, t, {"label": labels})
  uncond = fn(x, t, {"label": guidance.null_labels(6, K)})
  np.testing.assert_allclose(guidance.guided_denoiser(fn, labels, K, 1.0)(x, t), cond,
                             atol=1e-6)
  np.testing.assert_allclose(guidance.guided_denoiser(fn, labels, K, 0.0)(x, t), uncond,
                             atol=1e-6)
  np.testing.assert_allclose(guidance.conditional_denoiser(fn, labels)(x, t), cond)
  # Per-sample scales: row i as if guided alone with scale_i.
  scales = jnp.array([0.0, 1.0, 2.0, 3.0, 5.0, 7.5])
  got = guidance.guided_denoiser(fn, labels, K, scales)(x, t)
  for i, s in enumerate(np.asarray(scales)):
    np.testing.assert_allclose(got[i], (uncond + s * (cond - uncond))[i], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="guidance_scale must be a scalar or have shape"):
    guidance.guided_denoiser(fn, labels, K, jnp.ones(5))(x, t)


def test_one_batched_call_of_2b():
  calls = []
  fn = _toy_model_fn()

  def spy(x, t, cond):
    calls.append(x.shape[0])
    return fn(x, t, cond)
  x = jnp.ones((5, 2, 2, 1))
  guidance.guided_denoiser(spy, jnp.zeros(5, jnp.int32), K, 2.0)(x, jnp.zeros(5, jnp.int32))
  assert calls == [10]


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_guiding_the_output_is_guiding_eps(prediction):
  """For x0 and v models too: the guided output, read as eps, is the eps guidance."""
  fn = _toy_model_fn(seed=7)
  x = jax.random.normal(jax.random.key(8), (4, 3))
  t = jnp.array([10, 200, 600, 990], jnp.int32)
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  abar = diffusion.extract(LINEAR.alphas_cumprod, t, x)
  eps_of = lambda out: diffusion.model_output_to_x0_eps(abar, x, out, prediction)[1]
  s = 2.5
  eps_c = eps_of(fn(x, t, {"label": labels}))
  eps_u = eps_of(fn(x, t, {"label": guidance.null_labels(4, K)}))
  got = eps_of(guidance.guided_denoiser(fn, labels, K, s)(x, t))
  np.testing.assert_allclose(got, eps_u + s * (eps_c - eps_u), rtol=1e-4, atol=1e-4)


def test_new_scale_does_not_recompile():
  traces = []
  fn = _toy_model_fn()

  def counted(x, t, cond):
    traces.append(1)  # runs only while tracing
    return fn(x, t, cond)

  @jax.jit
  def draw(rng, scale):
    denoise = guidance.guided_denoiser(counted, jnp.zeros(8, jnp.int32), K, scale)
    return samplers.sample(denoise, LINEAR, (8, 2), rng, method="ddim", num_steps=5)

  for i, s in enumerate((1.0, 2.0, 3.0, 7.0)):
    draw(jax.random.key(i), jnp.float32(s)).block_until_ready()
  assert len(traces) == 1 and draw._cache_size() == 1
  for s in (np.linspace(0, 3, 8), np.full(8, 5.0)):  # per-sample scales: one more shape
    draw(jax.random.key(0), jnp.asarray(s, jnp.float32)).block_until_ready()
  assert draw._cache_size() == 2


@pytest.mark.parametrize("method,steps", [("ancestral", None), ("dpm_solver++", 25)])
def test_guidance_moves_the_mean_as_the_closed_form(method, steps):
  """Two Gaussian class oracles N(m_c, s^2) and an unconditional N(m_u, s^2).

  With a shared variance the guided eps, eps_u + w (eps_c - eps_u), is exactly
  the optimal eps of N(m_u + w (m_c - m_u), s^2): each is linear in x_t with the
  same slope. So sampling class c at scale w gives mean m_u + w (m_c - m_u) and
  std s, for every w.
  """
  means, sd = jnp.array([-0.4, 0.4, 0.1, 0.0]), 0.2  # classes 0, 1, 2; null (3): m_u = 0

  def model_fn(x, t, cond):
    a = diffusion.extract(LINEAR.alphas_cumprod, t, x)
    m = diffusion.broadcast_to(means[cond["label"]], x)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * m) / (a * sd**2 + 1 - a)

  per, scales = 20_000, np.array([0.0, 1.0, 2.0, 3.0], np.float32)
  labels = jnp.ones(per * len(scales), jnp.int32)  # class 1, m_c = 0.4
  s = jnp.asarray(np.repeat(scales, per))
  denoise = guidance.guided_denoiser(model_fn, labels, K, s)
  x = jax.jit(lambda r: samplers.sample(denoise, LINEAR, (len(s), 1), r, method=method,
                                        num_steps=steps, thresholding="none"))(jax.random.key(9))
  x = np.asarray(x, np.float64).reshape(len(scales), per)
  np.testing.assert_allclose(x.mean(1), 0.0 + scales * (0.4 - 0.0), atol=0.012)
  np.testing.assert_allclose(x.std(1), sd, rtol=0.04)


def _dynamic_np(x0, p):
  flat = np.abs(x0.reshape(len(x0), -1))
  s = np.maximum(np.percentile(flat, p, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("p", [99.5, 90.0, 50.0, 100.0])
def test_dynamic_threshold_matches_numpy(p):
  rng = np.random.default_rng(1)
  x0 = rng.normal(size=(6, 8, 8, 3)) * np.array([0.3, 1.0, 2.0, 3.0, 5.0, 0.9])[:, None, None, None]
  got = samplers.dynamic_threshold(jnp.asarray(x0, jnp.float32), p)
  np.testing.assert_allclose(got, _dynamic_np(x0, p), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(got).max()) <= 1.0 + 1e-6


def test_dynamic_threshold_is_identity_below_one():
  x0 = jax.random.uniform(jax.random.key(2), (5, 4, 4, 1), minval=-0.999, maxval=0.999)
  np.testing.assert_array_equal(samplers.dynamic_threshold(x0, 99.5), x0)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_thresholding_in_every_method(method):
  # Data far outside [-1, 1]: N(2, 0.5^2). The last step returns the processed x0.
  fn = oracles.gaussian_eps(LINEAR, 2.0, 0.5)
  out = {}
  for th in ("static", "dynamic"):
    out[th] = np.asarray(samplers.sample(fn, LINEAR, (64, 4, 4, 1), jax.random.key(3),
                                         method=method, num_steps=10, thresholding=th,
                                         dynamic_threshold_percentile=90.0))
  assert out["static"].max() == pytest.approx(1.0) and out["static"].min() >= -1.0
  assert np.abs(out["dynamic"]).max() <= 1.0 + 1e-6
  # Dynamic rescales where static saturates: fewer pixels sit at the bound.
  assert (out["dynamic"] >= 1.0 - 1e-6).mean() < (out["static"] >= 1.0).mean()


def test_clip_denoised_is_the_older_form_of_thresholding():
  fn = oracles.gaussian_eps(LINEAR, 0.8, 0.5)
  draw = lambda **kw: samplers.sample(fn, LINEAR, (16, 2), jax.random.key(4), method="ddim",
                                      num_steps=5, **kw)
  np.testing.assert_array_equal(draw(clip_denoised=False), draw(thresholding="none"))
  np.testing.assert_array_equal(draw(clip_denoised=True), draw())  # default: static
  with pytest.raises(ValueError, match="contradicts"):
    draw(clip_denoised=True, thresholding="dynamic")
  with pytest.raises(ValueError, match="none, static, dynamic"):
    draw(thresholding="soft")


def test_parse_labels():
  np.testing.assert_array_equal(guidance.parse_labels("", 3, 7), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(guidance.parse_labels("all", 3, 3), [0, 1, 2])
  np.testing.assert_array_equal(guidance.parse_labels("2", 3, 3), [2, 2, 2])
  np.testing.assert_array_equal(guidance.parse_labels(1, 3, 2), [1, 1])
  np.testing.assert_array_equal(guidance.parse_labels("0, 2", 3, 4), [0, 2, 0, 2])
  np.testing.assert_array_equal(guidance.parse_labels((2, 0), 3, 3), [2, 0, 2])
  with pytest.raises(ValueError, match="Class index 3 is out of range.*0 to 2"):
    guidance.parse_labels("1,3", 3, 4)
  with pytest.raises(ValueError, match="Class index -1"):
    guidance.parse_labels(-1, 3, 4)
  with pytest.raises(ValueError, match="comma-separated"):
    guidance.parse_labels("cat", 3, 4)
  with pytest.raises(ValueError, match="unconditional"):
    guidance.parse_labels("1", 0, 4)
