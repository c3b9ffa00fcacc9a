"""Distilling classifier-free guidance (Meng et al. 2023, "On Distillation of Guided
Diffusion Models"), the maths: the student's conditioning and its stage-1 loss.

A guided teacher calls its network twice per step (conditional and null
label, guidance.py); its student takes the guidance scale s as an input
(`cond['guidance']`, models/unet.py's zero-initialised embedding) and learns,
in one pass, the teacher's guided x0 at that scale:

    stage 1:  min E_{s, t, x, eps} max(SNR_t, 1) |x^_student(z_t, s) - x~_teacher^s(z_t)|^2

with s uniform in [guidance_min, guidance_max], t uniform over the schedule's
timesteps and x~_teacher^s the guided teacher's x0 (thresholded as its sampler
does). Stage 2 is progressive distillation (progressive.py) of that student,
each example at its own drawn scale, teacher and student given the same one.
The paper writes the guided output (1 + w) x_c - w x_u; here s = 1 + w.

Pure functions; the networks enter as `denoise_fn(x [B, ...], t int32 [B])`
closures that already hold the conditioning.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.distill.progressive import teacher_x0
from diffusion_jax.schedules import Schedule

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
_SCALE_DRAW = 11  # folded into a step's key for the guidance scales


def student_cond(labels: Optional[jax.Array], rng: jax.Array, guidance_range=None
                 ) -> Optional[dict[str, jax.Array]]:
  """The conditioning of a distillation batch: its labels (never dropped: the
  student learns the guided output, not the unconditional one) and, for a
  guided student, one scale per example drawn uniformly in `guidance_range`.

  Args:
    labels: int32 [B], or None for an unconditional model.
    rng: the step's key.
    guidance_range: (min, max), or None for a student without the input.
  """
  if labels is None:
    return None
  cond = {"label": labels}
  if guidance_range is not None:
    lo, hi = guidance_range
    cond["guidance"] = jax.random.uniform(jax.random.fold_in(rng, _SCALE_DRAW),
                                          labels.shape, jnp.float32, lo, hi)
  return cond


def stage1_loss(student_fn: DenoiseFn, guided_teacher_fn: DenoiseFn, schedule: Schedule,
                x0: jax.Array, rng: jax.Array, *, teacher_prediction: str,
                student_prediction: str = "v", thresholding: str = "static") -> jax.Array:
  """Per-example stage-1 loss [B] float32: the student's x0 against the guided teacher's.

  Args:
    student_fn: the student at the batch's scales (its cond holds them).
    guided_teacher_fn: the teacher guided at the same per-example scales
      (`guidance.guided_cond_denoiser`).
    schedule: the diffusion schedule.
    x0: [B, ...] data in [-1, 1].
    rng: key for t and the noise.
    teacher_prediction, student_prediction: the two parameterisations.
    thresholding: what is done to the teacher's x0.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  abar = schedule.alphas_cumprod[t]
  eps = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  b = lambda c: diffusion.broadcast_to(c, x0)
  z = b(jnp.sqrt(abar)) * x0 + b(jnp.sqrt(1.0 - abar)) * eps
  target = jax.lax.stop_gradient(
      teacher_x0(guided_teacher_fn, z, t, abar, teacher_prediction, thresholding))
  out = student_fn(z, t).astype(jnp.float32)
  x0_hat, _ = diffusion.model_output_to_x0_eps(b(abar), z, out, student_prediction)
  weight = jnp.maximum(abar / (1.0 - abar), 1.0)
  return weight * jnp.mean((target - x0_hat) ** 2, axis=tuple(range(1, x0.ndim)))
