"""What a model is conditioned on: one module per kind, one `cond` dict end to end.

The U-Net takes `cond`, a dict of [B, ...] arrays (models/unet.py reads its
keys). Each kind of conditioning owns its keys, in its own module:

  labels.py   class labels, `label` (conditioning.type = "class")
  text.py     captions through a trained or frozen encoder (conditioning.type
              = "text")
  clip_text.py
              captions through a CLIP's text encoder, the unCLIP prior's
              (conditioning.type = "clip_text")
  low_res.py  a super-resolution stage's input image, `low_res` and
              `aug_level` (model.low_res_channels > 0)
  image_embedding.py
              a CLIP image embedding, `image_embed`, the unCLIP decoder's
              (model.image_embed_dim > 0)
  guidance_input.py
              the guidance scale as an input, `guidance`, a guidance-distilled
              student's (model.guidance_embed)

A model may combine kinds (a class- or text-conditional super-resolution
stage). `Conditioning(config)` gathers the active ones; it is all the run
layer (train, sample, eval, cascade) knows of conditioning:

  init(B)                      zeros to initialise the parameters
  prepare_batch(batch)         host: captions -> text arrays
  sample_inputs(batch), batch_inputs(batch)
                               host: a data batch's captions and low-res images
                               (for training grids), and its labels (for eval)
  train(batch, rng, schedule)  traced: cond of a training step, with dropping
                               for guidance and super-resolution augmentation
  request(N, labels=, captions=, low_res=)
                               host: what a sample request turns into, a
                               `Request` (cond of [N, ...] arrays and what the
                               sample files record)
  check(cond, B)               host: a sampler call's cond, checked
  for_sampling(cond, rng, schedule), null(cond)
                               traced: the model's cond of a sampled batch and
                               its unconditional counterpart (guidance)

A new kind is a `base.Kind` subclass in its own module, added to KINDS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from diffusion_jax.conditioning import base
from diffusion_jax.conditioning.clip_text import ClipText
from diffusion_jax.conditioning.guidance_input import GuidanceInput, check_range
from diffusion_jax.conditioning.image_embedding import ImageEmbedding
from diffusion_jax.conditioning.labels import Labels
from diffusion_jax.conditioning.low_res import LowRes
from diffusion_jax.conditioning.text import Text
from diffusion_jax.config_checks import one_of, require
from diffusion_jax.schedules import Schedule

KINDS: tuple[type[base.Kind], ...] = (Labels, ClipText, Text, LowRes, ImageEmbedding,
                                      GuidanceInput)
# conditioning.type: "none", or a kind's own type ("class", "text").
TYPES = ("none",) + tuple(k.conditioning_type for k in KINDS if k.conditioning_type)


@dataclasses.dataclass
class Request:
  """A sample request: the sampler's cond, and what the sample files record.

  Attributes:
    cond: dict of [N, ...] arrays (None for an unconditional model).
    labels: int32 [N] class labels, or None.
    captions: the N captions, or None.
    image_embeds: float32 [N, D] CLIP image embeddings (unCLIP decoders), or None.
  """
  cond: Optional[dict[str, np.ndarray]]
  labels: Optional[np.ndarray] = None
  captions: Optional[list[str]] = None
  image_embeds: Optional[np.ndarray] = None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError("Bad config: ...") for conditioning fields and guidance."""
  c, s = config.conditioning, config.sample
  one_of("conditioning.type", c.type, TYPES)
  require(0.0 <= c.p_uncond < 1.0, f"conditioning.p_uncond must be in [0, 1), got "
          f"{c.p_uncond}.")
  for kind in KINDS:
    kind.validate(config)
  require(s.guidance_scale == 1.0 or _learnt_unconditional(config)
          or config.model.guidance_embed,
          f"sample.guidance_scale={s.guidance_scale} needs a class- or text-conditional model "
          "trained with conditioning dropout (conditioning.p_uncond > 0); use 1.0 otherwise. "
          "(An unCLIP decoder is guided by conditioning.p_uncond_image_embed > 0.)")


def _learnt_unconditional(config: ml_collections.ConfigDict) -> bool:
  """Whether training dropped some kind's conditioning (so guidance has a model)."""
  return any(k.droppable and k.active(config) and k.drop_probability(config) > 0
             for k in KINDS)


class Conditioning:
  """The active kinds of a config, as one object (see the module note).

  Args:
    config: the run config.
    text_encoder: a text/conditioner.TextConditioner to reuse (a frozen
      encoder is slow to load); default: built on first use.
  """

  def __init__(self, config: ml_collections.ConfigDict, text_encoder=None):
    self.config = config
    self.kinds = [Text(config, text_encoder) if k is Text else k(config)
                  for k in KINDS if k.active(config)]

  @property
  def guidable(self) -> bool:
    """Whether a kind is dropped in training (classifier-free guidance can use it)."""
    return any(k.droppable for k in self.kinds)

  @property
  def takes_guidance_scale(self) -> bool:
    """Whether the model takes the guidance scale as an input (one pass per step)."""
    return any(k.takes_guidance_scale for k in self.kinds)

  @property
  def upsamples(self) -> bool:
    """Whether the model upsamples the previous cascade stage's output."""
    return any(k.upsamples for k in self.kinds)

  @property
  def inputs(self) -> tuple[str, ...]:
    """The keyword arguments `request` takes (labels, captions, low_res)."""
    return tuple(name for k in self.kinds for name in k.inputs)

  @property
  def upsampled_input(self) -> Optional[str]:
    """The `request` input that takes the previous cascade stage's images, if any."""
    return next((k.inputs[0] for k in self.kinds if k.upsamples), None)

  @property
  def shared_inputs(self) -> tuple[str, ...]:
    """The inputs a cascade hands from its base to every stage (labels, captions)."""
    return tuple(name for k in self.kinds if not k.upsamples for name in k.inputs)

  def describe(self) -> str:
    return " and ".join(k.name for k in self.kinds) or "nothing (unconditional)"

  def _union(self, method: str, *args) -> Optional[dict]:
    if not self.kinds:
      return None
    out = {}
    for kind in self.kinds:
      out.update(getattr(kind, method)(*args))
    return out

  # ---- host side ---------------------------------------------------------
  def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    for kind in self.kinds:
      batch = kind.prepare_batch(batch)
    return batch

  def sample_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The request inputs (captions, low_res) a training grid takes from a batch."""
    return self._union("sample_inputs", batch) or {}

  def batch_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The request inputs of a data batch's own labels, captions and low-res images."""
    return self._union("batch_inputs", batch) or {}

  def request(self, num_samples: int, **given) -> Request:
    """What `config.sample` (and `given`: labels, captions, low_res) asks for."""
    given = {k: v for k, v in given.items() if v is not None}
    for name in given:
      if name not in self.inputs:
        raise ValueError(f"{name} was given, but the model is conditioned on "
                         f"{self.describe()}.")
    cond, record = {}, {}
    for kind in self.kinds:
      c, r = kind.request(num_samples, {k: given[k] for k in kind.inputs if k in given})
      cond.update(c)
      record.update(r)
    return Request(cond or None, record.get("labels"), record.get("captions"),
                   record.get("image_embeds"))

  def check(self, cond: Optional[dict], batch_size: int) -> Optional[dict]:
    """A sampler call's cond as numpy arrays, checked: keys, rows, dtypes, ranges."""
    cond = dict(cond or {})
    want = [key for k in self.kinds for key in k.request_keys()]
    extra = sorted(set(cond) - set(want))
    if extra:
      raise ValueError(f"cond holds {extra}, but the model is conditioned on "
                       f"{self.describe()}" + (f" (cond keys {want})." if want else "."))
    missing = [k for k in want if k not in cond]
    if missing:
      raise ValueError(f"The model is conditioned on {self.describe()}: cond lacks "
                       f"{missing}; build it with Conditioning(config).request(n, ...).")
    return self._union("check", cond, batch_size)

  def check_guidance(self, scale: float,
                     trained: Optional[ml_collections.ConfigDict] = None) -> None:
    """Raises ValueError for a guidance scale the model cannot honour.

    Args:
      scale: the requested guidance scale (1 = none).
      trained: the config the checkpoint was trained with (its config.json),
        which says whether it learnt an unconditional model; default this one.
    """
    if self.takes_guidance_scale:  # a distilled student: its trained range
      check_range(scale, self.config if trained is None else trained)
      return
    if np.all(np.asarray(scale) == 1.0):
      return
    if not self.guidable:
      raise ValueError(f"sample.guidance_scale={scale} needs a class- or text-conditional "
                       f"model; this one is conditioned on {self.describe()}. Use 1.0.")
    trained = self.config if trained is None else trained
    if not _learnt_unconditional(trained):
      raise ValueError(
          f"sample.guidance_scale={scale}, but the model was trained without conditioning "
          "dropout (conditioning.p_uncond = 0), so it has no unconditional model to guide "
          "with. Use sample.guidance_scale=1.0, or train with conditioning.p_uncond > 0.")

  # ---- traced ------------------------------------------------------------
  def init(self, batch_size: int = 1) -> Optional[dict[str, jax.Array]]:
    return self._union("init", batch_size)

  def train(self, batch: dict, rng: jax.Array, schedule: Schedule) -> Optional[dict]:
    return self._union("train", batch, rng, schedule)

  def for_sampling(self, cond: Optional[dict], rng: jax.Array,
                   schedule: Schedule) -> Optional[dict]:
    return self._union("for_sampling", cond, rng, schedule)

  def null(self, cond: Optional[dict]) -> Optional[dict]:
    return self._union("null", cond)


def init_cond(config: ml_collections.ConfigDict,
              batch_size: int = 1) -> Optional[dict[str, jax.Array]]:
  """Zeros shaped like the conditioning of `config`'s model, or None."""
  return Conditioning(config).init(batch_size)


__all__ = ["KINDS", "TYPES", "ClipText", "Conditioning", "GuidanceInput", "ImageEmbedding",
           "Labels", "LowRes", "Request", "Text", "init_cond", "validate"]
