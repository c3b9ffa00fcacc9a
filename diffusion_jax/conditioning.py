"""What the model is conditioned on, from a config: for init, training, sampling.

The U-Net takes `cond`, a dict whose keys follow from the model section
(models/unet.py). This module builds it:

* `init_cond`: zeros of the right shapes, to initialise the parameters;
* `train_cond`: from a training batch, with class labels dropped to the null
  class at rate `conditioning.p_uncond` (classifier-free guidance), and the
  low-resolution image of a super-resolution stage augmented (superres.py):
  noise at a level drawn uniformly in {0, ..., round(noise_aug_max (T-1))},
  and, with probability `blur_prob`, a Gaussian blur of sigma drawn uniformly
  in [blur_sigma_min, blur_sigma_max];
* `sample_low_res_cond`: the previous stage's output at the fixed sampling
  level `superres.sample_aug_level`.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import guidance, superres
from diffusion_jax.schedules import Schedule

# Purposes folded into a step's key (train.py uses 0-2 for its own streams).
_DROP, _AUG_LEVEL, _AUG_NOISE, _BLUR = 3, 4, 5, 6


def is_superres(config: ml_collections.ConfigDict) -> bool:
  """Whether the config describes a super-resolution stage."""
  return config.model.get("low_res_channels", 0) > 0


def init_cond(config: ml_collections.ConfigDict,
              batch_size: int = 1) -> Optional[dict[str, jax.Array]]:
  """Zeros shaped like the conditioning of `config`'s model, or None."""
  cond = {}
  if config.model.num_classes:
    cond["label"] = jnp.zeros((batch_size,), jnp.int32)
  if is_superres(config):
    s, c = config.data.low_res_size, config.model.low_res_channels
    cond["low_res"] = jnp.zeros((batch_size, s, s, c), jnp.float32)
    cond["aug_level"] = jnp.zeros((batch_size,), jnp.int32)
  return cond or None


def blur_radius(config: ml_collections.ConfigDict) -> int:
  """Kernel half-width covering 4 sigma of the largest training blur."""
  return max(1, math.ceil(4 * config.superres.blur_sigma_max))


def _augment_train(config, schedule: Schedule, low_res: jax.Array,
                   rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Training augmentation of low_res [B, h, w, C]: (augmented, level int32 [B])."""
  sr, b = config.superres, low_res.shape[0]
  if sr.blur_prob > 0:
    k_sigma, k_apply = jax.random.split(jax.random.fold_in(rng, _BLUR))
    sigma = jax.random.uniform(k_sigma, (b,), minval=sr.blur_sigma_min,
                               maxval=sr.blur_sigma_max)
    sigma = jnp.where(jax.random.bernoulli(k_apply, sr.blur_prob, (b,)), sigma, 0.0)
    low_res = superres.gaussian_blur(low_res, sigma, blur_radius(config))
  max_level = superres.level_from_fraction(sr.noise_aug_max, schedule.num_timesteps)
  level = jax.random.randint(jax.random.fold_in(rng, _AUG_LEVEL), (b,), 0, max_level + 1)
  noise = jax.random.normal(jax.random.fold_in(rng, _AUG_NOISE), low_res.shape)
  return superres.noise_augment(schedule, low_res, level, noise), level


def train_cond(config: ml_collections.ConfigDict, schedule: Schedule, batch: dict,
               rng: jax.Array) -> Optional[dict[str, jax.Array]]:
  """The model's conditioning for one training batch (inside the jitted step).

  Args:
    config: the run config.
    schedule: the diffusion schedule (noise augmentation uses it).
    batch: {'image', 'label' int32 [B], and 'low_res' [B, s, s, C] for a
      super-resolution stage}.
    rng: this step's key; the draws here use their own fold_in purposes.

  Returns:
    The cond dict, or None for an unconditional base model.
  """
  cond = {}
  if config.conditioning.type == "class":
    cond["label"] = guidance.drop_labels(
        jax.random.fold_in(rng, _DROP), batch["label"], config.conditioning.p_uncond,
        config.model.num_classes)
  if is_superres(config):
    cond["low_res"], cond["aug_level"] = _augment_train(config, schedule, batch["low_res"], rng)
  return cond or None


def sample_low_res_cond(config: ml_collections.ConfigDict, schedule: Schedule,
                        low_res: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
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
