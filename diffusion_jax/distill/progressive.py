"""Progressive distillation (Salimans & Ho 2022), the maths: grids, targets, loss.

A student sampling with n DDIM steps learns to take, in one step, the two steps
its teacher takes with 2n. The grids nest: the n-step grid is every other point
of the 2n-step one (`samplers.nested_timesteps`: t_k = round(k T / n) - 1, the
last step to alpha-bar 1), so a student's step from t_k to t_{k-1} spans the
teacher's t_{2k} -> t_{2k-1} -> t_{2k-2}.

The student's target is the x0 for which one deterministic DDIM step from z_t
lands where the teacher's two steps land (the paper's Algorithm 2):

    x~ = (z_end - (sigma_end / sigma_t) z_t) / (alpha_end - (sigma_end / sigma_t) alpha_t)

and its loss is `max(SNR_t, 1) * |x~ - x^_student(z_t)|^2` ("truncated SNR"
weighting, the paper's choice), the student predicting v. Pure functions: the
networks enter as `denoise_fn(x [B, ...], t int32 [B]) -> model output`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, samplers
from diffusion_jax.schedules import Schedule

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_step(z: jax.Array, x0: jax.Array, abar: jax.Array, abar_next: jax.Array) -> jax.Array:
  """One deterministic DDIM step from alpha-bar `abar` to `abar_next` given x0.

  z' = alpha' x0 + sigma' (z - alpha x0) / sigma: the eps implied by x0 (after
  any thresholding), as this project's DDIM steps. Coefficients broadcast
  from [B] to z's shape.
  """
  b = lambda c: diffusion.broadcast_to(c, z)
  eps = diffusion.eps_from_x0(b(abar), z, x0)
  return b(jnp.sqrt(abar_next)) * x0 + b(jnp.sqrt(1.0 - abar_next)) * eps


def teacher_x0(teacher_fn: DenoiseFn, z: jax.Array, t: jax.Array, abar: jax.Array,
               prediction: str, thresholding: str) -> jax.Array:
  """The teacher's x0 at (z_t, t), thresholded as its sampler does ("none", "static")."""
  out = teacher_fn(z, t).astype(jnp.float32)
  x0, _ = diffusion.model_output_to_x0_eps(diffusion.broadcast_to(abar, z), z, out, prediction)
  return jnp.clip(x0, -1.0, 1.0) if thresholding == "static" else x0


def two_step_target(teacher_fn: DenoiseFn, z: jax.Array, t: jax.Array, t_mid: jax.Array,
                    abar: jax.Array, abar_mid: jax.Array, abar_end: jax.Array,
                    prediction: str, thresholding: str = "static") -> jax.Array:
  """x~ such that one DDIM step z_t -> alpha-bar_end equals the teacher's two.

  Args:
    teacher_fn: the teacher network.
    z: [B, ...] noisy inputs at timesteps `t`.
    t, t_mid: int32 [B], the teacher's two timesteps.
    abar, abar_mid, abar_end: [B] alpha-bars at t, t_mid and the end point
      (1 where the student's step ends at x0).
    prediction: the teacher's parameterisation.
    thresholding: what is done to the teacher's x0 ("none" or "static").

  Returns:
    [B, ...] float32 target x0 for the student.
  """
  x0_at = lambda x, tt, ab: teacher_x0(teacher_fn, x, tt, ab, prediction, thresholding)
  z_mid = ddim_step(z, x0_at(z, t, abar), abar, abar_mid)
  z_end = ddim_step(z_mid, x0_at(z_mid, t_mid, abar_mid), abar_mid, abar_end)
  ratio = jnp.sqrt(1.0 - abar_end) / jnp.sqrt(1.0 - abar)
  b = lambda c: diffusion.broadcast_to(c, z)
  return (z_end - b(ratio) * z) / b(jnp.sqrt(abar_end) - ratio * jnp.sqrt(abar))


def student_grid(schedule: Schedule, student_steps: int):
  """Per student step k (from the noisiest): t, the teacher's t_mid, and alpha-bars.

  Returns:
    (t, t_mid, abar, abar_mid, abar_end): [student_steps] arrays.
  """
  T = schedule.num_timesteps
  t, t_end = samplers.step_timesteps(T, student_steps, "nested", "ddim")
  t_teacher, _ = samplers.step_timesteps(T, 2 * student_steps, "nested", "ddim")
  t_mid = t_teacher[1::2]  # the teacher's point between each t and t_end
  abar_of = lambda ts: samplers.alphas_cumprod_at(schedule, ts)
  return (jnp.asarray(t), jnp.asarray(t_mid), abar_of(t), abar_of(t_mid), abar_of(t_end))


def loss(student_fn: DenoiseFn, teacher_fn: DenoiseFn, schedule: Schedule, x0: jax.Array,
         rng: jax.Array, student_steps: int, *, teacher_prediction: str,
         student_prediction: str = "v", thresholding: str = "static") -> jax.Array:
  """Per-example distillation loss: [B] float32.

  Each example gets a step of the student's grid uniformly at random, z_t from
  the forward process, the teacher's two-step target and the truncated-SNR
  weight max(SNR_t, 1) on the squared x0 error (mean over pixels). The target
  carries no gradient.
  """
  t_all, mid_all, abar_all, abar_mid_all, abar_end_all = student_grid(schedule, student_steps)
  k_rng, noise_rng = jax.random.split(rng)
  k = jax.random.randint(k_rng, (x0.shape[0],), 0, student_steps)
  t, t_mid = t_all[k], mid_all[k]
  abar, abar_mid, abar_end = abar_all[k], abar_mid_all[k], abar_end_all[k]
  eps = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  b = lambda c: diffusion.broadcast_to(c, x0)
  z = b(jnp.sqrt(abar)) * x0 + b(jnp.sqrt(1.0 - abar)) * eps
  target = jax.lax.stop_gradient(two_step_target(
      teacher_fn, z, t, t_mid, abar, abar_mid, abar_end, teacher_prediction, thresholding))
  out = student_fn(z, t).astype(jnp.float32)
  x0_hat, _ = diffusion.model_output_to_x0_eps(b(abar), z, out, student_prediction)
  weight = jnp.maximum(abar / (1.0 - abar), 1.0)
  return weight * jnp.mean((target - x0_hat) ** 2, axis=tuple(range(1, x0.ndim)))
