"""Captions through a CLIP's text encoder (conditioning.type = "clip_text"): the prior's.

DALL-E 2's prior is conditioned on the caption's CLIP token states and CLIP
text embedding and generates the CLIP image embedding. `cond` holds
`text_tokens` [B, L, W] (zero at padding), `text_mask` [B, L] and
`text_embed` [B, D] (scaled like the image embeddings, unclip/clip_encoder).
Training replaces a caption by the empty one with probability
`conditioning.p_uncond` (DALL-E 2: 10%), as the text kind does.

The prior's diffusion state is the image embedding itself: `prepare_batch`
also turns the batch's images into their CLIP embeddings, `batch['image']`
[B, D], which is what the train step diffuses (models/prior.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.conditioning.text import Text
from diffusion_jax.config_checks import require

KEYS = ("text_tokens", "text_mask", "text_embed")


class _ClipCaptions:
  """A FrozenCLIP's text encoder in the TextConditioner interface (Text uses it)."""

  def __init__(self, clip):
    self.clip = clip

  def __call__(self, captions) -> dict[str, np.ndarray]:
    return self.clip.text(captions)

  def null(self, batch_size: int) -> dict[str, np.ndarray]:
    return self.clip.text([""] * batch_size)


class ClipText(Text):
  """The diffusion prior: captions through the CLIP whose image embeddings it draws."""
  name = "CLIP text"
  conditioning_type = "clip_text"

  @property
  def encoder(self):
    if self._encoder is None:
      # pylint: disable-next=g-import-not-at-top  (loads a checkpoint)
      from diffusion_jax.unclip.clip_encoder import FrozenCLIP
      clip = FrozenCLIP.from_config(self.config)
      check_prior_fits(self.config.model.prior, clip)
      self._encoder = _ClipCaptions(clip)
    return self._encoder

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    c, m, d = config.conditioning, config.model, config.data
    if c.type != "clip_text":
      require(m.name != "prior", "model.name='prior' (the unCLIP diffusion prior) needs "
              f"conditioning.type='clip_text', got {c.type!r}.")
      return
    require(m.name == "prior", "conditioning.type='clip_text' conditions the unCLIP prior: "
            f"set model.name='prior', got {m.name!r}.")
    require(bool(d.caption_key), "conditioning.type='clip_text' needs data.caption_key (the "
            "caption feature, e.g. 'caption' for the shapes data set).")
    require(bool(c.clip_workdir) != bool(c.clip_path), "The unCLIP prior needs exactly one "
            "CLIP: conditioning.clip_workdir or conditioning.clip_path (got "
            f"{c.clip_workdir!r} and {c.clip_path!r}).")

  def request_keys(self) -> tuple[str, ...]:
    return KEYS

  def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = super().prepare_batch(batch)
    batch["image"] = self.encoder.clip.image_embeddings(batch["image"])
    return batch

  def init(self, batch_size: int) -> dict[str, jax.Array]:
    p = self.config.model.prior
    return {"text_tokens": jnp.zeros((batch_size, p.max_text_length, p.text_width)),
            "text_mask": jnp.ones((batch_size, p.max_text_length), bool),
            "text_embed": jnp.zeros((batch_size, p.embed_dim))}


def check_prior_fits(prior: ml_collections.ConfigDict, clip) -> None:
  """Raises ValueError unless the prior's widths are the CLIP's (`model.prior.*`)."""
  clip.check_embed_dim(prior.embed_dim, "model.prior.embed_dim")
  for field, want in (("text_width", clip.text_width), ("max_text_length", clip.max_length)):
    if prior[field] != want:
      raise ValueError(f"model.prior.{field}={prior[field]}, but the CLIP ({clip.source}) "
                       f"has {want}: the prior was built for another CLIP. Set it to {want}, "
                       "or point conditioning.clip_workdir at the CLIP it was trained with.")
