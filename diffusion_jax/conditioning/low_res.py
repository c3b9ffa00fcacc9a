"""The low-resolution input of a super-resolution stage (model.low_res_channels > 0).

`cond['low_res']` [B, s, s, C] in [-1, 1] is the image to upsample, and
`cond['aug_level']` int32 [B] its noise-augmentation level (superres.py).
Training augments the batch's own low-resolution image: noise at a level drawn
uniformly in {0, ..., round(noise_aug_max (T-1))} and, with probability
`blur_prob`, a Gaussian blur of sigma uniform in [blur_sigma_min,
blur_sigma_max]. Sampling takes the previous stage's output (a request's
`low_res=`) and augments it once at the fixed level `superres.sample_aug_level`.
The low-resolution image is never dropped: guidance passes share it.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import superres
from diffusion_jax.conditioning import base
from diffusion_jax.config_checks import require

# Folded into a sampling call's key for the noise augmentation of low_res.
SAMPLE_AUG = 1 << 20


class LowRes(base.Kind):
  """Super-resolution stages (cascades): conditioned on an upsampled image."""
  name = "a low-resolution image"
  inputs = ("low_res",)
  upsamples = True

  @classmethod
  def active(cls, config: ml_collections.ConfigDict) -> bool:
    return config.model.low_res_channels > 0

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    d, m, sr = config.data, config.model, config.superres
    size, channels = d.low_res_size, m.low_res_channels
    require(bool(size) == bool(channels),
            f"data.low_res_size={size} and model.low_res_channels={channels}: a "
            "super-resolution stage sets both (low_res_channels = data.channels), a base "
            "model neither.")
    if not size:
      return
    require(0 < size < d.image_size, f"data.low_res_size={size} must lie in (0, "
            f"data.image_size={d.image_size}).")
    require(channels == d.channels, f"model.low_res_channels={channels} must equal "
            f"data.channels={d.channels} (the low-resolution image's channels).")
    for name in ("noise_aug_max", "sample_aug_level", "blur_prob"):
      require(0.0 <= sr[name] <= 1.0, f"superres.{name} must lie in [0, 1], got {sr[name]}.")
    require(0.0 <= sr.blur_sigma_min <= sr.blur_sigma_max,
            f"superres.blur_sigma_min={sr.blur_sigma_min} and blur_sigma_max="
            f"{sr.blur_sigma_max} must satisfy 0 <= min <= max.")

  def request_keys(self) -> tuple[str, ...]:
    return ("low_res",)

  def model_keys(self) -> tuple[str, ...]:
    return ("low_res", "aug_level")

  def _shape(self, batch_size: int) -> tuple[int, int, int, int]:
    s = self.config.data.low_res_size
    return (batch_size, s, s, self.config.model.low_res_channels)

  def sample_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    return {"low_res": batch["low_res"]}

  def request(self, num_samples: int, given: dict[str, Any]) -> tuple[dict, dict]:
    if given.get("low_res") is None:
      raise ValueError(f"A super-resolution stage needs low_res, float "
                       f"{list(self._shape(num_samples))} in [-1, 1] (the previous stage's "
                       "samples): sample it in a cascade, --config=configs/cascade.py:"
                       "BASE_DIR,SR_DIR.")
    return {"low_res": self._checked(given["low_res"], num_samples)}, {}

  def check(self, cond: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    return {"low_res": self._checked(cond["low_res"], batch_size)}

  def _checked(self, low_res, batch_size: int) -> np.ndarray:
    low_res = np.asarray(low_res, np.float32)
    want = self._shape(batch_size)
    if low_res.shape != want:
      raise ValueError(f"low_res must have shape {want} (data.low_res_size="
                       f"{want[1]}), got {low_res.shape}.")
    return low_res

  def init(self, batch_size: int) -> dict[str, jax.Array]:
    return {"low_res": jnp.zeros(self._shape(batch_size), jnp.float32),
            "aug_level": jnp.zeros((batch_size,), jnp.int32)}

  def train(self, batch, rng, schedule) -> dict[str, jax.Array]:
    sr, low_res = self.config.superres, batch["low_res"]
    b = low_res.shape[0]
    if sr.blur_prob > 0:
      k_sigma, k_apply = jax.random.split(jax.random.fold_in(rng, base.BLUR))
      sigma = jax.random.uniform(k_sigma, (b,), minval=sr.blur_sigma_min,
                                 maxval=sr.blur_sigma_max)
      sigma = jnp.where(jax.random.bernoulli(k_apply, sr.blur_prob, (b,)), sigma, 0.0)
      low_res = superres.gaussian_blur(low_res, sigma, blur_radius(self.config))
    max_level = superres.level_from_fraction(sr.noise_aug_max, schedule.num_timesteps)
    level = jax.random.randint(jax.random.fold_in(rng, base.AUG_LEVEL), (b,), 0,
                               max_level + 1)
    noise = jax.random.normal(jax.random.fold_in(rng, base.AUG_NOISE), low_res.shape)
    return {"low_res": superres.noise_augment(schedule, low_res, level, noise),
            "aug_level": level}

  def for_sampling(self, cond, rng, schedule) -> dict[str, jax.Array]:
    return sample_low_res_cond(self.config, schedule, cond["low_res"],
                               jax.random.fold_in(rng, SAMPLE_AUG))


def blur_radius(config: ml_collections.ConfigDict) -> int:
  """Kernel half-width covering 4 sigma of the largest training blur."""
  return max(1, math.ceil(4 * config.superres.blur_sigma_max))


def sample_low_res_cond(config: ml_collections.ConfigDict, schedule, low_res: jax.Array,
                        rng: jax.Array) -> dict[str, jax.Array]:
  """{'low_res', 'aug_level'} for sampling: the fixed level `superres.sample_aug_level`.

  Args:
    config: the super-resolution stage's config.
    schedule: its diffusion schedule.
    low_res: [B, s, s, C] in [-1, 1], the previous stage's output.
    rng: key of the augmentation noise.
  """
  level = superres.level_from_fraction(config.superres.sample_aug_level,
                                       schedule.num_timesteps)
  levels = jnp.full((low_res.shape[0],), level, jnp.int32)
  noise = jax.random.normal(rng, low_res.shape)
  return {"low_res": superres.noise_augment(schedule, low_res, levels, noise),
          "aug_level": levels}
