"""The DDPM variational bound in bits per dimension (DDPM section 3.3).

For 8-bit data scaled to [-1, 1], the negative ELBO is
  L = L_T + sum_{i=1}^{T-1} L_i + L_0,
  L_T = KL(q(x_T | x_0) || N(0, I)),
  L_i = KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))   (index i = paper's t-1),
  L_0 = -log p(x_0 | x_1) under a discretised Gaussian decoder,
with each L_i estimated by one draw x_i ~ q(x_i | x_0). The draw for index i
uses `jax.random.normal(jax.random.fold_in(rng, i), x0.shape)`, so a caller
can reproduce it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.diffusion import DenoiseFn
from diffusion_jax.schedules import Schedule


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) for x on the 8-bit grid in [-1, 1] under a discretised Gaussian.

  Each value owns the bin [x - 1/255, x + 1/255]; the two end bins extend to
  -inf and +inf (DDPM, eq. 13).

  Args:
    x: data on the grid {-1, -1 + 2/255, ..., 1}.
    mean, log_scale: the Gaussian's mean and log standard deviation.
  """
  z_plus = (x - mean + 1.0 / 255.0) * jnp.exp(-log_scale)
  z_minus = (x - mean - 1.0 / 255.0) * jnp.exp(-log_scale)
  log_cdf_plus = jax.scipy.special.log_ndtr(z_plus)
  log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-z_minus)
  # log(Phi(z+) - Phi(z-)) = log Phi(z+) + log(1 - exp(log Phi(z-) - log Phi(z+))).
  log_delta = log_cdf_plus + jnp.log1p(
      -jnp.exp(jnp.minimum(jax.scipy.special.log_ndtr(z_minus) - log_cdf_plus, -1e-12)))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def prior_kl(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """L_T in nats, summed over dimensions: [B]."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean = diffusion.extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
  var = diffusion.extract(1.0 - schedule.alphas_cumprod, t, x0)
  return _mean_flat(normal_kl(mean, jnp.log(var), 0.0, 0.0))


def _terms_at(denoise_fn, schedule, x0, t, noise, prediction, variance,
              clip_denoised):
  """L_i (KL for i >= 1, decoder NLL for i = 0) in nats [B] at timesteps t."""
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  out = diffusion.p_mean_variance(
      schedule, denoise_fn(x_t, t), x_t, t, prediction=prediction,
      variance=variance, clip_denoised=clip_denoised)
  true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, t)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
  nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, out["mean"], 0.5 * out["log_variance"]))
  return jnp.where(t == 0, nll, kl)


def vb_terms(denoise_fn: DenoiseFn, schedule: Schedule, x0: jnp.ndarray,
             rng: jax.Array, *, prediction: str = "eps",
             variance: str = "fixed_large", clip_denoised: bool = False,
             chunk_size: int = 10) -> jnp.ndarray:
  """All T reverse-process terms of the bound, in nats: [B, T].

  Column i is L_0 (the decoder NLL) for i = 0 and the KL term L_i otherwise.
  Timesteps are evaluated `chunk_size` at a time in one network call of
  batch B * chunk_size, inside a `lax.scan`, so memory does not grow with T.
  """
  B, T = x0.shape[0], schedule.num_timesteps
  num_chunks = -(-T // chunk_size)
  t_all = jnp.arange(num_chunks * chunk_size, dtype=jnp.int32)
  valid = t_all < T
  t_all = jnp.minimum(t_all, T - 1)  # padded entries repeat T-1, then masked

  def chunk(_, ts):
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i),
                                                 x0.shape, jnp.float32))(ts)
    rep = lambda a: jnp.reshape(a, (chunk_size * B,) + a.shape[2:])
    x0_rep = rep(jnp.broadcast_to(x0, (chunk_size,) + x0.shape))
    t_rep = jnp.repeat(ts, B)
    terms = _terms_at(denoise_fn, schedule, x0_rep, t_rep, rep(noise),
                      prediction, variance, clip_denoised)
    return None, terms.reshape(chunk_size, B)

  _, terms = jax.lax.scan(chunk, None, t_all.reshape(num_chunks, chunk_size))
  terms = terms.reshape(num_chunks * chunk_size, B)
  return jnp.where(valid[:, None], terms, 0.0)[:T].T


def bits_per_dim(denoise_fn: DenoiseFn, schedule: Schedule, x0: jnp.ndarray,
                 rng: jax.Array, *, prediction: str = "eps",
                 variance: str = "fixed_large", clip_denoised: bool = False,
                 chunk_size: int = 10) -> jnp.ndarray:
  """The DDPM negative ELBO of x0 in bits per dimension: [B].

  Args:
    denoise_fn: (x_t [B', ...], t int32 [B']) -> model output [B', ...].
      It is called with B' = B * chunk_size.
    schedule: the model's schedule.
    x0: [B, ...] 8-bit data scaled to [-1, 1] (values k / 127.5 - 1).
    rng: key for the one draw of x_i per timestep (see the module docstring).
    prediction: the model's parameterisation.
    variance: the reverse-process variance, "fixed_large" or "fixed_small".
    clip_denoised: clip the predicted x0 (DDPM reports the bound without).
    chunk_size: timesteps per network call.
  """
  num_dims = math.prod(x0.shape[1:])
  terms = vb_terms(denoise_fn, schedule, x0, rng, prediction=prediction,
                   variance=variance, clip_denoised=clip_denoised,
                   chunk_size=chunk_size)
  total = prior_kl(schedule, x0) + jnp.sum(terms, axis=1)
  return total / (num_dims * math.log(2.0))
