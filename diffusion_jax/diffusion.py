"""The forward process, parameterisations, posterior and training losses.

Shapes: `x0`, `x_t`, `noise`: [B, ...] float32 (images in [-1, 1]);
`t`: int32 [B] in {0, ..., T-1} (index i is the paper's t = i + 1).
The network enters only as `denoise_fn(x_t, t) -> model output` [B, ...].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import Schedule

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_large", "fixed_small")
WEIGHTINGS = ("none", "min_snr")


def check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
  """Raises a ValueError naming the valid values if `value` is not one."""
  if value not in valid:
    raise ValueError(f"Unknown {kind} {value!r}; valid values: {', '.join(valid)}.")


def broadcast_to(coef: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example coefficient [B] to broadcast against x [B, ...]."""
  coef = jnp.asarray(coef, jnp.float32)
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def extract(arr: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """arr[t] reshaped to broadcast against x. arr: [T]; t: [B]; x: [B, ...]."""
  return broadcast_to(arr[t], x)


def _check_t(schedule: Schedule, x: jnp.ndarray, t: jnp.ndarray) -> None:
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must have shape [B] = [{x.shape[0]}], got {t.shape}.")
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must be an integer array, got dtype {t.dtype}.")
  # The range can only be checked on concrete values (not under jit).
  if not isinstance(t, jax.core.Tracer):
    t_np = np.asarray(t)
    lo, hi = int(t_np.min()), int(t_np.max())
    if lo < 0 or hi >= schedule.num_timesteps:
      raise ValueError(f"t must lie in [0, {schedule.num_timesteps - 1}], got "
                       f"values in [{lo}, {hi}].")


def _check_same_shape(**arrays: jnp.ndarray) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"Shape mismatch: {shapes}.")


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray,
             noise: jnp.ndarray) -> jnp.ndarray:
  """Samples q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
  _check_same_shape(x0=x0, noise=noise)
  _check_t(schedule, x0, t)
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


# Conversions between parameterisations. `abar` is alpha-bar_t already
# broadcast to x_t's shape, so respaced samplers can use them directly.
def x0_from_eps(abar, x_t, eps):
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(abar, x_t, x0):
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_from_eps_x0(abar, eps, x0):
  return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def x0_from_v(abar, x_t, v):
  return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * v


def eps_from_v(abar, x_t, v):
  return jnp.sqrt(1.0 - abar) * x_t + jnp.sqrt(abar) * v


def model_output_to_x0_eps(abar, x_t, output, prediction: str):
  """(x0, eps) implied by a model output of the given parameterisation.

  Args:
    abar: alpha-bar_t broadcast to x_t's shape.
    x_t: [B, ...] noisy input.
    output: [B, ...] model output.
    prediction: "eps", "x0" or "v".
  """
  check_choice("prediction", prediction, PREDICTIONS)
  if prediction == "eps":
    return x0_from_eps(abar, x_t, output), output
  if prediction == "x0":
    return output, eps_from_x0(abar, x_t, output)
  return x0_from_v(abar, x_t, output), eps_from_v(abar, x_t, output)


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray,
                t: jnp.ndarray):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  _check_same_shape(x0=x0, x_t=x_t)
  _check_t(schedule, x_t, t)
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  return (mean, extract(schedule.posterior_variance, t, x_t),
          extract(schedule.posterior_log_variance_clipped, t, x_t))


def model_variance(schedule: Schedule, t: jnp.ndarray, x: jnp.ndarray,
                   variance: str):
  """The fixed reverse-process variance and its log at t, broadcast to x.

  "fixed_small" is the posterior variance (beta-tilde); "fixed_large" is
  beta_t, with index 0 set to beta-tilde at index 1 so the decoder's log
  variance is finite (as in the DDPM code).
  """
  check_choice("variance", variance, VARIANCES)
  if variance == "fixed_small":
    return (extract(schedule.posterior_variance, t, x),
            extract(schedule.posterior_log_variance_clipped, t, x))
  var = schedule.betas.at[0].set(schedule.posterior_variance[1])
  return extract(var, t, x), extract(jnp.log(var), t, x)


def p_mean_variance(schedule: Schedule, model_output: jnp.ndarray,
                    x_t: jnp.ndarray, t: jnp.ndarray, *,
                    prediction: str = "eps", variance: str = "fixed_large",
                    clip_denoised: bool = True) -> dict[str, jnp.ndarray]:
  """Mean and variance of p(x_{t-1} | x_t) from a model output.

  Returns:
    A dict with "mean", "variance", "log_variance", "pred_x0", "pred_eps",
    each [B, ...]. With clip_denoised, pred_x0 is clipped to [-1, 1] before
    the mean is formed (and pred_eps is the unclipped model's).
  """
  _check_same_shape(model_output=model_output, x_t=x_t)
  _check_t(schedule, x_t, t)
  abar = extract(schedule.alphas_cumprod, t, x_t)
  x0, eps = model_output_to_x0_eps(abar, x_t, model_output, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior(schedule, x0, x_t, t)
  var, log_var = model_variance(schedule, t, x_t, variance)
  return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=x0,
              pred_eps=eps)


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """Signal-to-noise ratio abar_t / (1 - abar_t) at t: [B]."""
  abar = schedule.alphas_cumprod[t]
  return abar / (1.0 - abar)


def loss_weight(schedule: Schedule, t: jnp.ndarray, prediction: str,
                weighting: str, min_snr_gamma: float = 5.0) -> jnp.ndarray:
  """Per-example weight [B] of the MSE in the chosen parameterisation.

  min-SNR-gamma (Hang et al. 2023) weighs the x0-space error by
  min(SNR, gamma); expressed in each parameterisation's own MSE this is
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
  min(SNR, gamma) / (SNR + 1) for v.
  """
  check_choice("weighting", weighting, WEIGHTINGS)
  check_choice("prediction", prediction, PREDICTIONS)
  if weighting == "none":
    return jnp.ones(t.shape, jnp.float32)
  s = snr(schedule, t)
  clipped = jnp.minimum(s, min_snr_gamma)
  return {"eps": clipped / s, "x0": clipped, "v": clipped / (s + 1.0)}[prediction]


def loss_at(denoise_fn: DenoiseFn, schedule: Schedule, x0: jnp.ndarray,
            t: jnp.ndarray, noise: jnp.ndarray, *, prediction: str = "eps",
            weighting: str = "none", min_snr_gamma: float = 5.0) -> jnp.ndarray:
  """Per-example loss [B] at given timesteps and noise."""
  check_choice("prediction", prediction, PREDICTIONS)
  x_t = q_sample(schedule, x0, t, noise)
  output = denoise_fn(x_t, t)
  if output.shape != x0.shape:
    raise ValueError(f"denoise_fn returned shape {output.shape}, expected {x0.shape}.")
  abar = extract(schedule.alphas_cumprod, t, x0)
  target = {"eps": noise, "x0": x0, "v": v_from_eps_x0(abar, noise, x0)}[prediction]
  mse = jnp.mean(jnp.square(output.astype(jnp.float32) - target),
                 axis=tuple(range(1, x0.ndim)))
  return mse * loss_weight(schedule, t, prediction, weighting, min_snr_gamma)


def loss(denoise_fn: DenoiseFn, schedule: Schedule, x0: jnp.ndarray,
         rng: jax.Array, *, prediction: str = "eps", weighting: str = "none",
         min_snr_gamma: float = 5.0) -> jnp.ndarray:
  """Algorithm 1: the per-example training loss [B] at a uniform random t.

  With prediction="eps" and weighting="none" this is DDPM's L_simple,
  ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 averaged
  over the non-batch dimensions.

  Args:
    denoise_fn: (x_t [B, ...], t int32 [B]) -> model output [B, ...].
    schedule: the noise schedule.
    x0: [B, ...] data in [-1, 1].
    rng: a PRNG key; split internally for t and noise.
    prediction: what the model predicts: "eps", "x0" or "v".
    weighting: "none" or "min_snr".
    min_snr_gamma: gamma for min-SNR weighting.
  """
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  return loss_at(denoise_fn, schedule, x0, t, noise, prediction=prediction,
                 weighting=weighting, min_snr_gamma=min_snr_gamma)
