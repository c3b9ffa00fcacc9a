"""Noise schedules for discrete-time diffusion (DDPM and successors).

Every schedule is computed in float64 numpy and stored as float32 arrays of
length T in a `Schedule` pytree, so it can be passed through `jax.jit`.
Index `i` in `{0, ..., T-1}` is the paper's timestep `t = i + 1`.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a diffusion process, all float32 [T].

  Attributes:
    betas: beta_t, the forward-process variances.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} (1 - beta_s).
    alphas_cumprod_prev: alpha-bar_{t-1}, with alpha-bar_0 := 1.
    sqrt_alphas_cumprod: sqrt(alpha-bar_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha-bar_t).
    posterior_variance: variance of q(x_{t-1} | x_t, x_0) (0 at index 0).
    posterior_log_variance_clipped: its log, with index 0 set to index 1's
      value (the true value is log 0).
    posterior_mean_coef1: coefficient of x_0 in the posterior mean.
    posterior_mean_coef2: coefficient of x_t in the posterior mean.
    num_timesteps: T (static, not traced).
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  num_timesteps: int = flax.struct.field(pytree_node=False)


def _linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> np.ndarray:
  # Scale both ends by 1000/T so that any T gives about the same total noise
  # as DDPM's T=1000 schedule (as improved-diffusion does).
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps,
                     dtype=np.float64)


def _quad_betas(num_timesteps: int, beta_start: float = 1e-4,
                beta_end: float = 0.02) -> np.ndarray:
  # DDPM's "quad": linear in sqrt(beta).
  scale = 1000.0 / num_timesteps
  return np.linspace(math.sqrt(scale * beta_start), math.sqrt(scale * beta_end),
                     num_timesteps, dtype=np.float64) ** 2


def _sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
  # DDPM's "sigmoid": a sigmoid over [-6, 6] rescaled to [start, end].
  scale = 1000.0 / num_timesteps
  start, end = scale * beta_start, scale * beta_end
  x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return start + (end - start) / (1.0 + np.exp(-x))


def _cosine_betas(num_timesteps: int, s: float = 0.008,
                  max_beta: float = 0.999) -> np.ndarray:
  # Nichol & Dhariwal (2021), eq. 17: alpha-bar(t) = f(t) / f(0) with
  # f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas clipped at max_beta to
  # avoid a singularity at t = T.
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
  betas = 1.0 - f[1:] / f[:-1]
  return np.minimum(betas, max_beta)


_BETA_FNS: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear_betas,
    "cosine": _cosine_betas,
    "quad": _quad_betas,
    "sigmoid": _sigmoid_betas,
}
SCHEDULE_NAMES = tuple(_BETA_FNS)


def derive_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
  """All Schedule arrays from betas, in the precision of `betas`.

  Args:
    betas: [T] float64 array in (0, 1).

  Returns:
    A dict with one [T] array per array field of `Schedule`.
  """
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # The posterior variance is 0 at index 0; its log is clipped to index 1's.
  log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  return dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=log_var_clipped,
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
  )


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Builds a Schedule from any betas (computed in float64, stored float32).

  Args:
    betas: [T] array with every value in (0, 1].

  Raises:
    ValueError: if betas is not 1-D or leaves (0, 1].
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 2:
    raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}.")
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError("betas must lie in (0, 1]; got min "
                     f"{betas.min():.3g}, max {betas.max():.3g}.")
  arrays = {k: jnp.asarray(v, dtype=jnp.float32)
            for k, v in derive_constants(betas).items()}
  return Schedule(num_timesteps=int(betas.size), **arrays)


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
  """Creates a named noise schedule.

  Args:
    name: one of "linear" (DDPM), "cosine" (improved DDPM), "quad", "sigmoid".
    num_timesteps: T >= 2.
    **kwargs: schedule parameters (beta_start/beta_end for linear, quad and
      sigmoid, given at T=1000; s/max_beta for cosine).

  Returns:
    The Schedule.

  Raises:
    ValueError: for an unknown name, T < 2 or an unknown keyword.
  """
  if name not in _BETA_FNS:
    raise ValueError(f"Unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}.")
  if int(num_timesteps) != num_timesteps or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")
  try:
    betas = _BETA_FNS[name](int(num_timesteps), **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for schedule {name!r}: {e}") from e
  if betas.max() >= 1.0:
    # Scaling DDPM's betas by 1000/T breaks down for small T.
    raise ValueError(f"Schedule {name!r} at num_timesteps={num_timesteps} gives "
                     f"beta up to {betas.max():.3g} >= 1; use more timesteps "
                     "(>= 50) or the cosine schedule.")
  return schedule_from_betas(betas)
