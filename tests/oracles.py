"""Analytic denoisers for tests: optimal eps predictors for known data laws.

For data x0 ~ N(m, s^2) per dimension and x_t = a x0 + sigma eps
(a = sqrt(abar), sigma^2 = 1 - abar), x_t ~ N(a m, a^2 s^2 + sigma^2) and
E[eps | x_t] = sigma (x_t - a m) / (a^2 s^2 + sigma^2).
A mixture sum_k w_k N(m_k, s_k^2) gives the responsibility-weighted sum.
"""
import jax.numpy as jnp
import numpy as np


def _abar(schedule, t, x):
  return schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))


def gaussian_eps(schedule, mean, std):
  """denoise_fn(x_t, t) -> E[eps | x_t] for x0 ~ N(mean, std^2)."""
  def fn(x, t):
    a = _abar(schedule, t, x)
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * std**2 + 1 - a)
  return fn


def mixture_eps(schedule, weights, means, stds):
  """denoise_fn for a 1-D Gaussian mixture (applied per dimension)."""
  w, m, s = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

  def fn(x, t):
    a = _abar(schedule, t, x)[..., None]
    xe = x[..., None]
    var = a * s**2 + 1 - a
    logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xe - jnp.sqrt(a) * m) ** 2 / var
    r = jnp.exp(logp - jnp.max(logp, axis=-1, keepdims=True))
    r = r / jnp.sum(r, axis=-1, keepdims=True)
    return jnp.sum(r * jnp.sqrt(1 - a) * (xe - jnp.sqrt(a) * m) / var, axis=-1)
  return fn


def gaussian_eps_np(abar, x, mean, std):
  """float64 numpy twin of gaussian_eps for a given abar (broadcastable)."""
  return np.sqrt(1 - abar) * (x - np.sqrt(abar) * mean) / (abar * std**2 + 1 - abar)
