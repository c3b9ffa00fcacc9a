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

# The keys of text conditioning in a batch and in `cond` (text/conditioner.py).
TEXT_KEYS = ("text_ids", "text_mask", "tokens", "mask", "vector")
# Purposes folded into a step's key (train.py uses 0-2 for its own streams).
_DROP, _AUG_LEVEL, _AUG_NOISE, _BLUR = 3, 4, 5, 6


def is_superres(config: ml_collections.ConfigDict) -> bool:
  """Whether the config describes a super-resolution stage."""
  return config.model.get("low_res_channels", 0) > 0


def is_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the config describes a text-conditioned model."""
  return config.conditioning.type == "text"


def init_cond(config: ml_collections.ConfigDict,
              batch_size: int = 1) -> Optional[dict[str, jax.Array]]:
  """Zeros shaped like the conditioning of `config`'s model, or None."""
  cond, m = {}, config.model
  if m.num_classes:
    cond["label"] = jnp.zeros((batch_size,), jnp.int32)
  if is_text(config) and config.conditioning.text_encoder == "trained":
    cond["text_ids"] = jnp.zeros((batch_size, m.text_max_length), jnp.int32)
    cond["text_mask"] = jnp.ones((batch_size, m.text_max_length), bool)
  elif is_text(config):
    length = config.conditioning.text_max_length
    cond["tokens"] = jnp.zeros((batch_size, length, m.cross_attn_dim), jnp.float32)
    cond["mask"] = jnp.ones((batch_size, length), bool)
    cond["vector"] = jnp.zeros((batch_size, m.cond_vector_dim), jnp.float32)
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


def drop_text(rng: jax.Array, text: dict, null_text: dict, p_uncond: float) -> dict:
  """Each example's text replaced by the null text with probability p_uncond.

  Args:
    rng: key of the draw.
    text: the batch's text conditioning, a dict of [B, ...] arrays.
    null_text: the empty caption's, the same keys with a leading 1 (or B).
    p_uncond: the probability.
  """
  b = next(iter(text.values())).shape[0]
  drop = jax.random.bernoulli(rng, p_uncond, (b,))
  return {k: jnp.where(drop.reshape((b,) + (1,) * (v.ndim - 1)), null_text[k], v)
          for k, v in text.items()}


def train_cond(config: ml_collections.ConfigDict, schedule: Schedule, batch: dict,
               rng: jax.Array, null_text: Optional[dict] = None
               ) -> Optional[dict[str, jax.Array]]:
  """The model's conditioning for one training batch (inside the jitted step).

  Args:
    config: the run config.
    schedule: the diffusion schedule (noise augmentation uses it).
    batch: {'image', 'label' int32 [B], 'low_res' [B, s, s, C] for a
      super-resolution stage, and the text arrays of a text-conditioned model
      (text/conditioner.py: TEXT_KEYS)}.
    rng: this step's key; the draws here use their own fold_in purposes.
    null_text: the empty caption's text arrays ([1, ...]), for text models.

  Returns:
    The cond dict, or None for an unconditional base model.
  """
  cond = {}
  if config.conditioning.type == "class":
    cond["label"] = guidance.drop_labels(
        jax.random.fold_in(rng, _DROP), batch["label"], config.conditioning.p_uncond,
        config.model.num_classes)
  if is_text(config):
    text = {k: batch[k] for k in TEXT_KEYS if k in batch}
    if not text or null_text is None:
      raise ValueError("A text-conditioned train step needs the batch's text arrays and the "
                       "null text (see text/conditioner.py).")
    cond.update(drop_text(jax.random.fold_in(rng, _DROP), text, null_text,
                          config.conditioning.p_uncond))
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
