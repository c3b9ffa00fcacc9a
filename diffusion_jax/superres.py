"""Conditioning maths of super-resolution (cascade) stages.

A super-resolution stage is the usual diffusion model over the high-resolution
image x [B, H, W, C], conditioned on a low-resolution image z [B, h, w, C]
(Cascaded Diffusion Models, Ho et al. 2021; GLIDE; DALL-E 2; Imagen). The
U-Net upsamples z to H x W (`upsample`) and concatenates it with x_t.

Noise-conditioning augmentation (CDM section 4.2, Imagen section 2.5): z is
corrupted by the forward process at an augmentation level, and the level is a
second input of the network (embedded like a timestep). Levels are int32 [B]
in {0, ..., T-1} of the model's own schedule:

  level 0:        z_aug = z (unchanged)
  level k >= 1:   z_aug = sqrt(abar[k-1]) z + sqrt(1 - abar[k-1]) eps

i.e. level k is the forward process at the paper's timestep k, so level T-1
leaves almost nothing of z (abar[T-2] ~ 4e-5 for the linear schedule of
T = 1000). Training draws levels uniformly up to a maximum; sampling applies
one fixed level to the previous stage's output.

Gaussian blur augmentation (CDM; DALL-E 2's first upsampler) blurs z with a
per-example sigma during training only.

Pure functions of jax arrays; no Flax, no config.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

UPSAMPLE_METHODS = ("nearest", "bilinear", "bicubic")


def level_from_fraction(fraction: float, num_timesteps: int) -> int:
  """The integer level for a fraction in [0, 1] of the schedule: round(f (T-1))."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"augmentation level fraction must lie in [0, 1], got {fraction}.")
  return int(round(fraction * (num_timesteps - 1)))


def aug_alpha_bar(schedule: Schedule, level: jax.Array) -> jax.Array:
  """Signal fraction abar of each level: 1 at level 0, abar[level-1] after.

  Args:
    schedule: the model's diffusion schedule (T timesteps).
    level: int32 [B] in {0, ..., T-1}.

  Returns:
    float32 [B].
  """
  level = jnp.asarray(level, jnp.int32)
  shifted = schedule.alphas_cumprod[jnp.maximum(level - 1, 0)]
  return jnp.where(level == 0, 1.0, shifted).astype(jnp.float32)


def noise_augment(schedule: Schedule, low_res: jax.Array, level: jax.Array,
                  noise: jax.Array) -> jax.Array:
  """Corrupts the conditioning image by the forward process at `level`.

  Args:
    schedule: the model's diffusion schedule.
    low_res: [B, h, w, C] float in [-1, 1].
    level: int32 [B] in {0, ..., T-1}; 0 leaves `low_res` exactly unchanged.
    noise: standard normal, the shape of `low_res`.

  Returns:
    float32 [B, h, w, C].
  """
  if noise.shape != low_res.shape:
    raise ValueError(f"noise {noise.shape} and low_res {low_res.shape} differ in shape.")
  abar = aug_alpha_bar(schedule, level).reshape((-1,) + (1,) * (low_res.ndim - 1))
  return jnp.sqrt(abar) * low_res + jnp.sqrt(1.0 - abar) * noise


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
  """Normalised 1-D Gaussian kernels: [B, 2 radius + 1] for sigma [B].

  sigma 0 gives the identity kernel (a one at the centre).
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)[:, None]
  weights = jnp.exp(-0.5 * (offsets[None, :] / sigma) ** 2)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def gaussian_blur(images: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur with a per-example sigma.

  Borders are reflected about the edge of the last pixel (numpy's
  "symmetric", scipy.ndimage's "reflect"), so a constant image stays constant.

  Args:
    images: [B, H, W, C] float.
    sigma: [B] standard deviations in pixels (0 leaves the image unchanged).
    radius: kernel half-width in pixels, static; 4 sigma_max covers the kernel
      to 3e-4 of its peak, as scipy's default `truncate=4.0`.

  Returns:
    float32 [B, H, W, C].
  """
  if images.ndim != 4 or sigma.shape != images.shape[:1]:
    raise ValueError(f"images must be [B, H, W, C] and sigma [B]; got {images.shape} and "
                     f"{sigma.shape}.")
  kernels = gaussian_kernels(sigma, radius)[:, :, None, None]  # [B, K, 1, 1]
  x = images.astype(jnp.float32)
  for axis in (1, 2):  # rows, then columns
    size = x.shape[axis]
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    taps = [jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(2 * radius + 1)]
    stacked = jnp.stack(taps, axis=1)  # [B, K, H, W, C]
    x = jnp.sum(stacked * kernels[..., None], axis=1)
  return x


def upsample(low_res: jax.Array, size: int, method: str = "bilinear") -> jax.Array:
  """Resizes [B, h, w, C] to [B, size, size, C] (jax.image.resize, half-pixel centres)."""
  if method not in UPSAMPLE_METHODS:
    raise ValueError(f"Unknown upsampling method {method!r}; valid: {UPSAMPLE_METHODS}.")
  b, _, _, c = low_res.shape
  return jax.image.resize(low_res.astype(jnp.float32), (b, size, size, c), method)
