"""A CLIP image embedding (model.image_embed_dim > 0): the unCLIP decoder's input.

DALL-E 2's decoder is a GLIDE-style U-Net conditioned on the CLIP image
embedding of the picture it is to draw: projected and added to the timestep
embedding, and projected to `model.image_embed_tokens` extra cross-attention
tokens (models/unet.py). `cond['image_embed']` is float32 [B, D], the CLIP
embedding scaled to norm sqrt(D) (unclip/clip_encoder.scaled).

Training embeds each batch's own images with the frozen CLIP
(`conditioning.clip_workdir` or `clip_path`) on the host, and replaces an
embedding by zeros with probability `conditioning.p_uncond_image_embed`
(DALL-E 2: 10%), so the decoder also learns to draw without one (guidance).
Sample requests take `image_embeds` [N, D]: from the prior (unclip/pipeline),
or an image's own embedding (variations).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.conditioning import base
from diffusion_jax.config_checks import require


class ImageEmbedding(base.Kind):
  """unCLIP decoders: a CLIP image embedding through the U-Net's embedding input."""
  name = "CLIP image embeddings"
  inputs = ("image_embeds",)
  droppable = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.dim = config.model.image_embed_dim
    self._clip = None

  @classmethod
  def active(cls, config: ml_collections.ConfigDict) -> bool:
    return config.model.image_embed_dim > 0

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    c, m = config.conditioning, config.model
    require(m.image_embed_dim >= 0 and m.image_embed_tokens >= 0,
            f"model.image_embed_dim and model.image_embed_tokens must be >= 0, got "
            f"{m.image_embed_dim} and {m.image_embed_tokens}.")
    require(0.0 <= c.p_uncond_image_embed < 1.0, "conditioning.p_uncond_image_embed must be "
            f"in [0, 1), got {c.p_uncond_image_embed}.")
    if not m.image_embed_dim:
      return
    require(m.name in ("unet", "text_unet"), f"model.image_embed_dim={m.image_embed_dim} "
            "makes an unCLIP decoder, a U-Net (model.name='unet', or 'text_unet' to read "
            f"captions as well), got model.name={m.name!r}.")
    require(bool(c.clip_workdir) != bool(c.clip_path), "An unCLIP decoder "
            "(model.image_embed_dim > 0) needs exactly one CLIP: conditioning.clip_workdir or "
            f"conditioning.clip_path (got {c.clip_workdir!r} and {c.clip_path!r}).")
    require(not m.image_embed_tokens or m.cross_attn_dim > 0,
            f"model.image_embed_tokens={m.image_embed_tokens} makes cross-attention tokens of "
            "the image embedding: set model.cross_attn_dim and model.cross_attn_resolutions, "
            "or model.image_embed_tokens=0.")

  @property
  def clip(self):
    """The frozen CLIP (loaded on first use), checked against the model's width."""
    if self._clip is None:
      # pylint: disable-next=g-import-not-at-top  (loads a checkpoint)
      from diffusion_jax.unclip.clip_encoder import FrozenCLIP
      clip = FrozenCLIP.from_config(self.config)
      clip.check_embed_dim(self.dim, "model.image_embed_dim")
      self._clip = clip
    return self._clip

  @staticmethod
  def drop_probability(config: ml_collections.ConfigDict) -> float:
    return config.conditioning.p_uncond_image_embed

  def request_keys(self) -> tuple[str, ...]:
    return ("image_embed",)

  # ---- host side ---------------------------------------------------------
  def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    return dict(batch, image_embed=self.clip.image_embeddings(batch["image"]))

  def sample_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    # Training grids and eval redraw the batch's own images from their embeddings.
    return {"image_embeds": self.clip.image_embeddings(batch["image"])}

  def request(self, num_samples: int, given: dict[str, Any]) -> tuple[dict, dict]:
    embeds = given.get("image_embeds")
    if embeds is None:
      raise ValueError("An unCLIP decoder draws from CLIP image embeddings: sample it with "
                       "the unCLIP pipeline (configs/unclip.py:PRIOR_DIR,DECODER_DIR, which "
                       "also makes variations of images), or pass image_embeds [N, "
                       f"{self.dim}].")
    embeds = np.asarray(embeds, np.float32)
    if embeds.shape != (num_samples, self.dim):
      raise ValueError(f"image_embeds has shape {embeds.shape}; the decoder takes "
                       f"[{num_samples}, {self.dim}] (one CLIP embedding per sample).")
    return {"image_embed": embeds}, {"image_embeds": embeds}

  def check(self, cond: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    emb = np.asarray(cond["image_embed"])
    if emb.shape != (batch_size, self.dim) or not np.issubdtype(emb.dtype, np.floating):
      raise ValueError(f"cond['image_embed'] must be float [{batch_size}, {self.dim}], got "
                       f"{emb.dtype} {emb.shape}.")
    if not np.all(np.isfinite(emb)):
      raise ValueError("cond['image_embed'] holds NaN or infinite values.")
    return {"image_embed": emb.astype(np.float32)}

  # ---- traced ------------------------------------------------------------
  def init(self, batch_size: int) -> dict[str, jax.Array]:
    return {"image_embed": jnp.zeros((batch_size, self.dim), jnp.float32)}

  def train(self, batch, rng, schedule) -> dict[str, jax.Array]:
    del schedule
    if "image_embed" not in batch:
      raise ValueError("An unCLIP decoder's train step needs batch['image_embed'] "
                       "(Conditioning.prepare_batch embeds the images with the CLIP).")
    emb = batch["image_embed"]
    drop = jax.random.bernoulli(jax.random.fold_in(rng, base.EMBED_DROP),
                                self.config.conditioning.p_uncond_image_embed, emb.shape[:1])
    return {"image_embed": jnp.where(drop[:, None], 0.0, emb)}

  def null(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"image_embed": jnp.zeros_like(cond["image_embed"])}
