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

To reproduce a diffusers pipeline step for step, pick its conventions:
`timestep_spacing` ("linspace", "leading" or "trailing": which timesteps are
visited and where each step goes, as DDPMScheduler does for "ancestral" and
DDIMScheduler for "ddim"), `ddim_eps="raw"` (DDIMScheduler's default
use_clipped_model_output=False) and the same starting noise (`x_T`). Its
`clip_sample=True` (clip_sample_range 1) is thresholding="static".
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
# "uniform": this project's grid (improved-diffusion's respacing); the others
# are diffusers' `timestep_spacing` values (ancestral and DDIM only).
# "nested": t_k = round(k T / n) - 1 for k = n..1, each step to the next point and
# the last to x0; every other point of the 2n-step grid is the n-step grid, as
# progressive distillation needs (distill/progressive.py).
TIMESTEP_SPACINGS = ("uniform", "linspace", "leading", "trailing", "nested")
# The eps DDIM steps with after the x0 is thresholded: "clipped" re-derives it
# from the thresholded x0 (improved-diffusion, DDIM's paper code); "raw" keeps
# the model's (diffusers' DDIMScheduler, use_clipped_model_output=False).
DDIM_EPS = ("clipped", "raw")


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


def diffusers_timesteps(num_timesteps: int, num_steps: int, spacing: str) -> np.ndarray:
  """The timesteps diffusers' DDPMScheduler and DDIMScheduler visit (set_timesteps).

  As diffusers 0.42 computes them with steps_offset 0: "linspace" rounds
  linspace(0, T - 1, n) (the same grid as `spaced_timesteps`); "leading" is
  k (T // n) for k < n; "trailing" is round(T - k T / n) - 1.

  Returns:
    int32 [num_steps], decreasing (the order they are visited).
  """
  T, n = num_timesteps, num_steps
  diffusion.check_choice("diffusers timestep_spacing", spacing, TIMESTEP_SPACINGS[1:4])
  if not 1 <= n <= T:
    raise ValueError(f"num_steps must be in [1, {T}] (the schedule's T), got {n}.")
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == "leading":
    ts = (np.arange(n) * (T // n)).round()[::-1]
  else:
    ts = np.round(np.arange(T, 0, -T / n)) - 1
    if len(ts) != n:
      # np.arange's float step overshoots for some (T, n), e.g. 61 of 1000:
      # diffusers then visits n + 1 timesteps, the last one -1.
      raise ValueError(f"timestep_spacing='trailing' with num_steps={n} of {T}: "
                       f"diffusers' grid has {len(ts)} timesteps ending at {int(ts[-1])} "
                       "(a floating-point artefact of its np.arange); choose another "
                       "num_steps or spacing.")
  return ts.astype(np.int32)


def step_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform",
                   method: str = "ancestral") -> tuple[np.ndarray, np.ndarray]:
  """Each step's timestep and the timestep it steps to, for ancestral and DDIM.

  "uniform" steps from each point of `spaced_timesteps` to the next. diffusers'
  spacings visit `diffusers_timesteps` and step as its schedulers do: the
  ancestral sampler (DDPMScheduler.previous_timestep) to the next timestep
  visited, DDIM (DDIMScheduler.step) to t - T // n, which is off the grid for
  "linspace" (and for "trailing" where n does not divide T).

  Returns:
    (t, t_prev), int32 [num_steps] each, from the noisiest step; t_prev = -1
    means x_0 itself, alpha-bar 1 (diffusers' DDIM with set_alpha_to_one=True,
    its default).
  """
  diffusion.check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule's T), "
                     f"got {num_steps}.")
  if spacing == "uniform":
    t = spaced_timesteps(num_timesteps, num_steps)[::-1]
  elif spacing == "nested":
    t = np.round(num_timesteps * np.arange(num_steps, 0, -1) / num_steps) - 1
    return t.astype(np.int32), np.append(t[1:], -1).astype(np.int32)
  else:
    t = diffusers_timesteps(num_timesteps, num_steps, spacing)
  if method == "ddim" and spacing != "uniform":
    t_prev = np.maximum(t - num_timesteps // num_steps, -1)
  else:
    t_prev = np.concatenate([t[1:], [-1]])
  return t.astype(np.int32), t_prev.astype(np.int32)


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


def _predict(denoise_fn, x, t_idx, abar, prediction, threshold, raw_eps=False):
  """(x0, eps) at scalar timestep t_idx with alpha-bar abar, x0 processed.

  `threshold` is (thresholding, percentile), passed on to `_finish_x0`. The
  eps is the one implied by the processed x0, or with `raw_eps` the one
  implied by the model output itself.
  """
  t = jnp.full((x.shape[0],), t_idx, jnp.int32)
  out = denoise_fn(x, t).astype(jnp.float32)
  if out.shape != x.shape:
    raise ValueError(f"denoise_fn returned shape {out.shape}, expected {x.shape}.")
  x0, eps_raw = diffusion.model_output_to_x0_eps(abar, x, out, prediction)
  x0 = _finish_x0(x0, *threshold)
  if raw_eps:
    return x0, eps_raw
  # eps implied by the (possibly clipped) x0, as DDIM and the posterior use.
  return x0, diffusion.eps_from_x0(abar, x, x0)


def _ancestral_step(denoise_fn, prediction, threshold, variance, x, xs):
  """Algorithm 2, one step x_t -> x_{t-1} on a (possibly respaced) grid."""
  t_idx, abar, abar_prev, key, add_noise = xs
  x0, _ = _predict(denoise_fn, x, t_idx, abar, prediction, threshold)
  beta = 1.0 - abar / abar_prev  # respaced beta (equals beta_t on the full grid)
  coef1 = beta * jnp.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar)
  mean = coef1 * x0 + coef2 * x
  var = beta if variance == "fixed_large" else beta * (1.0 - abar_prev) / (1.0 - abar)
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return mean + add_noise * jnp.sqrt(var) * noise, x0


def _ddim_step(denoise_fn, prediction, threshold, eta, raw_eps, x, xs):
  """DDIM (Song et al. 2021, eq. 12) from alpha-bar_t to alpha-bar_prev."""
  t_idx, abar, abar_prev, key, _ = xs
  x0, eps = _predict(denoise_fn, x, t_idx, abar, prediction, threshold, raw_eps)
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


def alphas_cumprod_at(schedule: Schedule, t: np.ndarray) -> jnp.ndarray:
  """alpha-bar at timesteps `t` (`step_timesteps`' values), where t = -1 is x_0
  itself: alpha-bar 1, where the last step lands."""
  abar_ext = jnp.concatenate([schedule.alphas_cumprod, jnp.ones((1,), jnp.float32)])
  return abar_ext[np.where(np.asarray(t) < 0, schedule.num_timesteps, t)]


def _grid_inputs(schedule: Schedule, t: np.ndarray, t_prev: np.ndarray,
                 add_noise: np.ndarray, rng: jax.Array):
  """Per-step scan inputs (`step_timesteps` order, from the noisiest step)."""
  keys = jax.random.split(rng, len(t))[::-1]
  return (jnp.asarray(t), alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, t_prev),
          keys, jnp.asarray(add_noise, jnp.float32))


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


def _check_args(schedule, shape, method, num_steps, prediction, variance, spacing,
                ddim_eps):
  diffusion.check_choice("sampling method", method, METHODS)
  diffusion.check_choice("prediction", prediction, diffusion.PREDICTIONS)
  diffusion.check_choice("variance", variance, diffusion.VARIANCES)
  diffusion.check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
  diffusion.check_choice("ddim_eps", ddim_eps, DDIM_EPS)
  if method == "dpm_solver++" and spacing != "uniform":
    raise ValueError(f"timestep_spacing={spacing!r} is for the ancestral and ddim methods; "
                     "dpm_solver++ steps on its own log-SNR grid: use timestep_spacing="
                     "'uniform'.")
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
           clip_denoised: Optional[bool] = None, return_trajectory: bool = False,
           timestep_spacing: str = "uniform", ddim_eps: str = "clipped",
           x_T: Optional[jax.Array] = None):
  """Draws samples by running the reverse process from x_T ~ N(0, I).

  Args:
    denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
    schedule: the schedule the model was trained with.
    shape: [B, ...] of the samples, e.g. (B, H, W, C).
    rng: PRNG key; the same key gives the same samples.
    method: "ancestral" (DDPM Algorithm 2), "ddim" or "dpm_solver++"
      (DPM-Solver++(2M) on a log-SNR-uniform grid).
    num_steps: network evaluations; None means all T. Ancestral and DDIM use
      the timesteps of `timestep_spacing` (betas recomputed for the subset).
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
    timestep_spacing: the ancestral and DDIM timesteps (`step_timesteps`):
      "uniform" (evenly strided, each step to the next grid point) or, as
      diffusers' DDPMScheduler (ancestral) and DDIMScheduler (ddim) do,
      "linspace", "leading" or "trailing". With these the ancestral sampler
      adds noise wherever t > 0, as DDPMScheduler does: also on the last step
      of "trailing", which matters for variance "fixed_large".
      dpm_solver++ takes "uniform" only (its log-SNR grid).
    ddim_eps: the eps DDIM steps with after thresholding x0: "clipped" (the one
      the thresholded x0 implies) or "raw" (the model's, as diffusers'
      DDIMScheduler with use_clipped_model_output=False). Other methods only
      use x0.
    x_T: the starting noise [shape]; None draws it from `rng` (the rest of
      `rng`'s use is the same either way).

  Returns:
    x_0 [shape] float32, or (x_0, trajectory [num_steps, *shape]) with the
    trajectory ordered from the noisiest step to the last.
  """
  n = _check_args(schedule, shape, method, num_steps, prediction, variance,
                  timestep_spacing, ddim_eps)
  threshold = (resolve_thresholding(thresholding, clip_denoised),
               jnp.asarray(dynamic_threshold_percentile, jnp.float32))
  init_key, loop_key = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(init_key, tuple(shape), jnp.float32)
  elif tuple(jnp.shape(x_T)) != tuple(shape):
    raise ValueError(f"x_T has shape {tuple(jnp.shape(x_T))}, expected {tuple(shape)}.")
  else:
    x_T = jnp.asarray(x_T, jnp.float32)
  if method == "dpm_solver++":
    step = functools.partial(_dpm_step, denoise_fn, prediction, threshold)
    (x, _), traj = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)),
                                _dpm_inputs(schedule, n))
  else:
    t, t_prev = step_timesteps(schedule.num_timesteps, n, timestep_spacing, method)
    # No noise on the last step; diffusers' DDPMScheduler: none where t = 0.
    add_noise = ((np.arange(n) < n - 1) if timestep_spacing in ("uniform", "nested")
                 else t > 0)
    if method == "ancestral":
      step = functools.partial(_ancestral_step, denoise_fn, prediction,
                               threshold, variance)
    else:
      step = functools.partial(_ddim_step, denoise_fn, prediction, threshold,
                               jnp.asarray(eta, jnp.float32), ddim_eps == "raw")
    inputs = _grid_inputs(schedule, t, t_prev, add_noise, loop_key)
    x, traj = jax.lax.scan(step, x_T, inputs)
  return (x, traj) if return_trajectory else x
