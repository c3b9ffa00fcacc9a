"""Reverse-process samplers, each one `jax.lax.scan` over its steps.

`sample(denoise_fn, schedule, shape, rng, ...)` draws x_T ~ N(0, I) and runs
the chosen sampler down to x_0. The network enters only as
`denoise_fn(x_t [B, ...], t int32 [B]) -> model output [B, ...]`; samplers on
a subset of timesteps call it with the original timestep indices.

Compile it once per (shape, method, num_steps) by closing over the network's
parameters inside a jitted function and passing numbers such as `eta` as
arguments:

    @jax.jit
    def draw(params, rng, eta):
      fn = lambda x, t: model.apply(params, x, t, train=False)
      return sample(fn, schedule, (16, 32, 32, 3), rng, method="ddim",
                    num_steps=50, eta=eta)

Classifier-free guidance is a denoise_fn too (guidance.guided_denoiser), and
every method takes the same thresholding of the predicted x0: "none",
"static" (clip to [-1, 1]) or "dynamic" (Imagen).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import DenoiseFn
from diffusion_jax.schedules import Schedule

METHODS = ("ancestral", "ddim", "dpm_solver++")
THRESHOLDINGS = ("none", "static", "dynamic")


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly strided timestep indices, as improved-diffusion's respacing.

  Returns:
    int32 [num_steps], increasing, from 0 to T-1 (both included when
    num_steps >= 2), equal to arange(T) when num_steps == T.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule's T), "
                     f"got {num_steps}.")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  stride = (num_timesteps - 1) / (num_steps - 1)
  return np.round(np.arange(num_steps) * stride).astype(np.int32)


def log_snr_timesteps(schedule: Schedule, num_steps: int) -> jnp.ndarray:
  """Timestep indices uniform in log-SNR, for DPM-Solver.

  Each target lambda = log(alpha/sigma) on a uniform grid from lambda(0) to
  lambda(T-1) is mapped to the nearest discrete timestep; collisions (where
  the discrete grid is coarse, near t = 0) are pushed up, and indices capped
  so the rest fit, so they stay strictly increasing. Works on traced
  schedules.

  Returns:
    int32 [num_steps], strictly increasing, from 0 to T-1.
  """
  T = schedule.num_timesteps
  if not 2 <= num_steps <= T:
    raise ValueError(f"dpm_solver++ needs num_steps in [2, {T}], got {num_steps}.")
  abar = schedule.alphas_cumprod
  lam = 0.5 * (jnp.log(abar) - jnp.log1p(-abar))  # decreasing in t
  targets = jnp.linspace(lam[0], lam[-1], num_steps)
  nearest = jnp.argmin(jnp.abs(lam[None, :] - targets[:, None]), axis=1)
  k = jnp.arange(num_steps)
  pushed_up = k + jax.lax.cummax(nearest - k, axis=0)
  # Cap each index so the ones after it still fit below T; the minimum of
  # two sequences that each rise by at least one per step rises too.
  return jnp.minimum(pushed_up, T - num_steps + k).astype(jnp.int32)


def dynamic_threshold(x0: jnp.ndarray, percentile) -> jnp.ndarray:
  """Imagen's dynamic thresholding (Saharia et al. 2022, Section 2.3).

  Per sample, s = max(1, the `percentile`-th percentile of |x0| over all its
  pixels); x0 is clipped to [-s, s] and divided by s. Samples whose |x0| are
  all at most 1 are unchanged.

  Args:
    x0: [B, ...] predicted x0.
    percentile: in (0, 100] (Imagen: 99.5), as numpy's `percentile` (linear
      interpolation); a runtime value.

  Returns:
    [B, ...] in [-1, 1].
  """
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.percentile(flat, jnp.asarray(percentile, jnp.float32), axis=1)
  s = diffusion.broadcast_to(jnp.maximum(s, 1.0), x0)
  return jnp.clip(x0, -s, s) / s


def _finish_x0(x0: jnp.ndarray, thresholding: str, percentile) -> jnp.ndarray:
  # The one place the predicted x0 is post-processed before it is used.
  if thresholding == "static":
    return jnp.clip(x0, -1.0, 1.0)
  if thresholding == "dynamic":
    return dynamic_threshold(x0, percentile)
  return x0


def _predict(denoise_fn, x, t_idx, abar, prediction, threshold):
  """(x0, eps) at scalar timestep t_idx with alpha-bar abar, x0 processed.

  `threshold` is (thresholding, percentile), passed on to `_finish_x0`.
  """
  t = jnp.full((x.shape[0],), t_idx, jnp.int32)
  out = denoise_fn(x, t).astype(jnp.float32)
  if out.shape != x.shape:
    raise ValueError(f"denoise_fn returned shape {out.shape}, expected {x.shape}.")
  x0, _ = diffusion.model_output_to_x0_eps(abar, x, out, prediction)
  x0 = _finish_x0(x0, *threshold)
  # eps implied by the (possibly clipped) x0, as DDIM and the posterior use.
  return x0, diffusion.eps_from_x0(abar, x, x0)


def _ancestral_step(denoise_fn, prediction, threshold, variance, x, xs):
  """Algorithm 2, one step x_t -> x_{t-1} on a (possibly respaced) grid."""
  t_idx, abar, abar_prev, key, not_last = xs
  x0, _ = _predict(denoise_fn, x, t_idx, abar, prediction, threshold)
  beta = 1.0 - abar / abar_prev  # respaced beta (equals beta_t on the full grid)
  coef1 = beta * jnp.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar)
  mean = coef1 * x0 + coef2 * x
  var = beta if variance == "fixed_large" else beta * (1.0 - abar_prev) / (1.0 - abar)
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return mean + not_last * jnp.sqrt(var) * noise, x0


def _ddim_step(denoise_fn, prediction, threshold, eta, x, xs):
  """DDIM (Song et al. 2021, eq. 12) from alpha-bar_t to alpha-bar_prev."""
  t_idx, abar, abar_prev, key, _ = xs
  x0, eps = _predict(denoise_fn, x, t_idx, abar, prediction, threshold)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise, x0


def _dpm_step(denoise_fn, prediction, threshold, carry, xs):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data-prediction form."""
  x, d_prev = carry
  t_idx, abar, lam, lam_prev, lam_next, alpha_next, sigma, sigma_next, first, last = xs
  d, _ = _predict(denoise_fn, x, t_idx, abar, prediction, threshold)
  h = lam_next - lam
  r = (lam - lam_prev) / h
  d_2m = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
  d_used = jnp.where(first, d, d_2m)
  x_next = (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d_used
  # The last step goes to sigma = 0, where the first-order update is d itself.
  x_next = jnp.where(last, d, x_next)
  return (x_next, d), d


def _grid_inputs(schedule: Schedule, ts: np.ndarray, rng: jax.Array):
  """Per-step scan inputs, ordered from the noisiest step to t = 0."""
  abar = schedule.alphas_cumprod[ts]
  abar_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), abar[:-1]])
  keys = jax.random.split(rng, len(ts))
  not_last = (jnp.arange(len(ts)) > 0).astype(jnp.float32)
  rev = lambda a: a[::-1]
  return tuple(map(rev, (jnp.asarray(ts), abar, abar_prev, keys, not_last)))


def _dpm_inputs(schedule: Schedule, num_steps: int):
  ts = log_snr_timesteps(schedule, num_steps)[::-1]  # T-1 ... 0
  abar = schedule.alphas_cumprod[ts]
  alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  lam = jnp.log(alpha) - jnp.log(sigma)
  # Dummy neighbours at the ends keep every expression finite; `first` and
  # `last` select the update that does not use them.
  lam_prev = jnp.concatenate([lam[:1] - 1.0, lam[:-1]])
  lam_next = jnp.concatenate([lam[1:], lam[-1:] + 1.0])
  alpha_next = jnp.concatenate([alpha[1:], jnp.ones((1,), jnp.float32)])
  sigma_next = jnp.concatenate([sigma[1:], sigma[-1:]])
  k = jnp.arange(num_steps)
  return (ts, abar, lam, lam_prev, lam_next, alpha_next, sigma, sigma_next,
          k == 0, k == num_steps - 1)


def resolve_thresholding(thresholding: Optional[str],
                         clip_denoised: Optional[bool]) -> str:
  """The thresholding to use, from the new option or the older boolean.

  `clip_denoised=True` is "static" and `False` is "none"; neither given means
  "static" (the earlier default). Giving both is an error unless they agree.
  """
  if clip_denoised is None:
    thresholding = "static" if thresholding is None else thresholding
  else:
    implied = "static" if clip_denoised else "none"
    if thresholding not in (None, implied):
      raise ValueError(f"clip_denoised={clip_denoised} contradicts thresholding="
                       f"{thresholding!r}; pass thresholding only.")
    thresholding = implied
  diffusion.check_choice("thresholding", thresholding, THRESHOLDINGS)
  return thresholding


def _check_args(schedule, shape, method, num_steps, prediction, variance):
  diffusion.check_choice("sampling method", method, METHODS)
  diffusion.check_choice("prediction", prediction, diffusion.PREDICTIONS)
  diffusion.check_choice("variance", variance, diffusion.VARIANCES)
  if len(shape) < 2 or any(int(d) != d or d < 1 for d in shape):
    raise ValueError(f"shape must be [B, ...] of positive ints, got {shape}.")
  T = schedule.num_timesteps
  n = T if num_steps is None else num_steps
  if int(n) != n or not 1 <= n <= T:
    raise ValueError(f"num_steps must be an integer in [1, {T}] (the schedule's T), "
                     f"got {num_steps}.")
  return int(n)


def sample(denoise_fn: DenoiseFn, schedule: Schedule, shape: tuple[int, ...],
           rng: jax.Array, *, method: str = "ancestral",
           num_steps: Optional[int] = None, eta=0.0, prediction: str = "eps",
           variance: str = "fixed_large", thresholding: Optional[str] = None,
           dynamic_threshold_percentile=99.5,
           clip_denoised: Optional[bool] = None, return_trajectory: bool = False):
  """Draws samples by running the reverse process from x_T ~ N(0, I).

  Args:
    denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
    schedule: the schedule the model was trained with.
    shape: [B, ...] of the samples, e.g. (B, H, W, C).
    rng: PRNG key; the same key gives the same samples.
    method: "ancestral" (DDPM Algorithm 2), "ddim" or "dpm_solver++"
      (DPM-Solver++(2M) on a log-SNR-uniform grid).
    num_steps: network evaluations; None means all T. Ancestral and DDIM use
      evenly strided timesteps (betas recomputed for the subset).
    eta: DDIM noise scale (0 = deterministic, 1 = ancestral with posterior
      variance); a runtime value, not a static argument.
    prediction: the model's parameterisation: "eps", "x0" or "v".
    variance: ancestral variance: "fixed_large" (beta_t) or "fixed_small".
    thresholding: what is done to each predicted x0 before it is used:
      "none", "static" (clip to [-1, 1], DDPM) or "dynamic" (Imagen, see
      `dynamic_threshold`). Default "static". For DPM-Solver++ it acts on
      the data prediction, as that paper does.
    dynamic_threshold_percentile: the percentile of |x0| for "dynamic", in
      (0, 100]; a runtime value.
    clip_denoised: the older boolean form: True = "static", False = "none".
    return_trajectory: also return the predicted x0 of every step.

  Returns:
    x_0 [shape] float32, or (x_0, trajectory [num_steps, *shape]) with the
    trajectory ordered from the noisiest step to the last.
  """
  n = _check_args(schedule, shape, method, num_steps, prediction, variance)
  threshold = (resolve_thresholding(thresholding, clip_denoised),
               jnp.asarray(dynamic_threshold_percentile, jnp.float32))
  init_key, loop_key = jax.random.split(rng)
  x_T = jax.random.normal(init_key, tuple(shape), jnp.float32)
  if method == "dpm_solver++":
    step = functools.partial(_dpm_step, denoise_fn, prediction, threshold)
    (x, _), traj = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)),
                                _dpm_inputs(schedule, n))
  else:
    ts = spaced_timesteps(schedule.num_timesteps, n)
    if method == "ancestral":
      step = functools.partial(_ancestral_step, denoise_fn, prediction,
                               threshold, variance)
    else:
      step = functools.partial(_ddim_step, denoise_fn, prediction, threshold,
                               jnp.asarray(eta, jnp.float32))
    x, traj = jax.lax.scan(step, x_T, _grid_inputs(schedule, ts, loop_key))
  return (x, traj) if return_trajectory else x
