"""Captions (conditioning.type = "text"): GLIDE's trained or Imagen's frozen encoder.

A batch's captions (data.caption_key) become arrays on the host
(text/conditioner.py): `text_ids`, `text_mask` [B, L] for "trained" (the
U-Net's own text transformer reads them), or `tokens` [B, L, D], `mask`
[B, L] and `vector` [B, D] for "frozen". Training replaces each caption by
the empty one (the null text) with probability `conditioning.p_uncond`.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.conditioning import base
from diffusion_jax.config_checks import one_of, require

TRAINED_KEYS = ("text_ids", "text_mask")
FROZEN_KEYS = ("tokens", "mask", "vector")


class Text(base.Kind):
  """Text-conditioned models; the encoder is built on first use (host side)."""
  name = "text"
  conditioning_type = "text"
  inputs = ("captions",)
  droppable = True

  def __init__(self, config: ml_collections.ConfigDict, encoder=None):
    super().__init__(config)
    self._encoder, self._null = encoder, None

  @property
  def encoder(self):
    """The text/conditioner.TextConditioner of the config (loads a frozen encoder)."""
    if self._encoder is None:
      # pylint: disable-next=g-import-not-at-top  (a frozen encoder needs the `text` extra)
      from diffusion_jax.text import conditioner
      self._encoder = conditioner.TextConditioner(self.config)
    return self._encoder

  @property
  def null_text(self) -> dict[str, np.ndarray]:
    """The empty caption's arrays [1, ...], the null text of guidance (cached)."""
    if self._null is None:
      # It may first be asked for while a train step or sampler is traced; a
      # frozen encoder is itself a JAX computation: run it now, not staged.
      with jax.ensure_compile_time_eval():
        self._null = {k: np.asarray(v) for k, v in self.encoder.null(1).items()}
    return self._null

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    c, m, d, s = config.conditioning, config.model, config.data, config.sample
    if c.type == "clip_text" or m.name == "clip":  # the prior's or a CLIP's captions
      return  # (clip_text.py and config_lib check them)
    if c.type != "text":
      require(m.name != "text_unet", "model.name='text_unet' needs conditioning.type='text'.")
      require(not d.caption_key, f"data.caption_key={d.caption_key!r} reads captions, but "
              f"the model is not text-conditioned (conditioning.type={c.type!r}); set "
              "data.caption_key='' or conditioning.type='text'.")
      require(not str(s.captions).strip(), f"sample.captions={s.captions!r}, but the model "
              f"is not text-conditioned (conditioning.type={c.type!r}); it cannot follow "
              "captions.")
      return
    require(bool(d.caption_key), "conditioning.type='text' needs data.caption_key (the "
            "caption feature, e.g. 'caption' for the shapes data set).")
    one_of("conditioning.text_encoder", c.text_encoder, ("trained", "frozen"))
    want = "text_unet" if c.text_encoder == "trained" else "unet"
    require(m.name == want, f"conditioning.text_encoder={c.text_encoder!r} needs "
            f"model.name={want!r}, got {m.name!r}.")
    require(m.cross_attn_dim > 0 and m.cond_vector_dim > 0,
            "A text-conditioned model needs model.cross_attn_dim and model.cond_vector_dim "
            "> 0 (the text encoder's width).")
    require(m.num_classes == 0, "A text-conditioned model takes no class labels "
            "(model.num_classes = 0).")
    one_of("conditioning.frozen_encoder_dtype", c.frozen_encoder_dtype,
           ("float32", "bfloat16"))
    length = m.text_max_length if c.text_encoder == "trained" else c.text_max_length
    require(length >= 3, f"The text context must hold at least 3 tokens (begin, one, end); "
            f"got {length} (model.text_max_length for 'trained', conditioning.text_max_length "
            "for 'frozen').")

  def request_keys(self) -> tuple[str, ...]:
    trained = self.config.conditioning.text_encoder == "trained"
    return TRAINED_KEYS if trained else FROZEN_KEYS

  def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    batch.update(self.encoder(batch.pop("caption")))
    return batch

  def sample_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    return {"captions": [_decode(c) for c in batch["caption"]]}

  def request(self, num_samples: int, given: dict[str, Any]) -> tuple[dict, dict]:
    captions = given.get("captions")
    if captions is None:
      captions = sample_captions(self.config.sample.captions, num_samples)
    captions = [_decode(c) for c in captions]
    if len(captions) != num_samples:
      raise ValueError(f"{len(captions)} captions were given for {num_samples} samples.")
    return self.encoder(captions), {"captions": captions}

  def check(self, cond: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    for key in self.request_keys():
      if base.rows_of(cond[key]) != batch_size:
        raise ValueError(f"cond[{key!r}] has {base.rows_of(cond[key])} rows for a batch of "
                         f"{batch_size}.")
    return {k: np.asarray(cond[k]) for k in self.request_keys()}

  def init(self, batch_size: int) -> dict[str, jax.Array]:
    m, c = self.config.model, self.config.conditioning
    if c.text_encoder == "trained":
      return {"text_ids": jnp.zeros((batch_size, m.text_max_length), jnp.int32),
              "text_mask": jnp.ones((batch_size, m.text_max_length), bool)}
    length = c.text_max_length
    return {"tokens": jnp.zeros((batch_size, length, m.cross_attn_dim), jnp.float32),
            "mask": jnp.ones((batch_size, length), bool),
            "vector": jnp.zeros((batch_size, m.cond_vector_dim), jnp.float32)}

  def train(self, batch, rng, schedule) -> dict[str, jax.Array]:
    del schedule
    missing = [k for k in self.request_keys() if k not in batch]
    if missing:
      raise ValueError(f"A text-conditioned train step needs the batch's text arrays "
                       f"{missing} (Conditioning.prepare_batch encodes the captions).")
    text = {k: batch[k] for k in self.request_keys()}
    return drop_text(jax.random.fold_in(rng, base.DROP), text, self.null_text,
                     self.config.conditioning.p_uncond)

  def null(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    null = self.null_text
    return {k: jnp.broadcast_to(null[k], cond[k].shape) for k in self.request_keys()}


def _decode(caption) -> str:
  return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


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


def sample_captions(spec: str, num_samples: int) -> list[str]:
  """The captions a spec asks for ("a;b" or "@FILE", one per line), cycled to N."""
  spec = str(spec).strip()
  if spec.startswith("@"):
    if not os.path.isfile(spec[1:]):
      raise FileNotFoundError(f"sample.captions={spec!r}: no caption file {spec[1:]!r} (one "
                              "caption per line); give its path after '@', or the captions "
                              "themselves, 'a red circle;a blue square'.")
    with open(spec[1:]) as f:
      captions = [line.strip() for line in f if line.strip()]
  else:
    captions = [c.strip() for c in spec.split(";") if c.strip()]
  if not captions:
    raise ValueError("A text-conditioned model samples from captions: set sample.captions, "
                     "e.g. --config.sample.captions='a small red circle;a large blue square' "
                     "or --config.sample.captions=@captions.txt (one per line).")
  return [captions[i % len(captions)] for i in range(num_samples)]

