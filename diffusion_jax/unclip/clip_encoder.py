"""A trained CLIP as fixed host-side encoders of images and captions.

Both unCLIP models read CLIP's outputs and never train it: the prior is
conditioned on a caption's token states and text embedding and learns to
produce the image embedding; the decoder is conditioned on the image
embedding. `FrozenCLIP.from_config(config)` loads the CLIP a config names,
`conditioning.clip_workdir` (a CLIP trained here, its EMA parameters) or
`conditioning.clip_path` (a Hugging Face `CLIPModel` folder); one instance
per source is kept, so the prior and decoder kinds of a run share it.

Embeddings are L2-normalised and scaled by sqrt(D) (`scaled`): each
coordinate then has variance about 1/1 as the N(0, I) endpoint of the
prior's diffusion expects (as in the public DALL-E 2 reproductions).
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# CLIP's (OpenAI) pixel statistics, for Hugging Face checkpoints.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_BATCH = 64  # every encoder call has this batch: one compile each


def scaled(embeddings: jax.Array) -> jax.Array:
  """[N, D] -> the same directions with norm sqrt(D) (coordinates of variance ~1)."""
  norm = jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  return embeddings / jnp.maximum(norm, 1e-12) * np.sqrt(embeddings.shape[-1])


class FrozenCLIP:
  """A CLIP's image and text encoders on host numpy, in fixed batches.

  Attributes:
    embed_dim: D, the width of both embeddings.
    text_width: the width of the text token states.
    max_length: tokens per caption.
    image_size, channels: the pixels the image encoder takes.
    source: where it was loaded from (in messages).
  """

  def __init__(self, module, params, tokenizer, *, max_length: int, source: str,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.embed_dim, self.text_width = module.embed_dim, module.text_width
    self.image_size, self.channels = module.image_size, module.image_channels
    self.max_length, self.source = max_length, source
    self._mean, self._std = mean, std
    self._memo: collections.OrderedDict[str, tuple] = collections.OrderedDict()
    self._image_fn = jax.jit(self._encode_images)
    self._text_fn = jax.jit(self._encode_texts)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "FrozenCLIP":
    """The CLIP of `conditioning.clip_workdir` or `conditioning.clip_path` (cached)."""
    c = config.conditioning
    if bool(c.clip_workdir) == bool(c.clip_path):
      raise ValueError("An unCLIP model needs exactly one CLIP: conditioning.clip_workdir (a "
                       "CLIP trained here, configs/shapes_clip.py) or conditioning.clip_path "
                       "(a Hugging Face CLIPModel folder); got clip_workdir="
                       f"{c.clip_workdir!r}, clip_path={c.clip_path!r}.")
    if c.clip_workdir:
      return _from_workdir(os.path.abspath(c.clip_workdir))
    return _from_hf(os.path.abspath(c.clip_path))

  def check_embed_dim(self, width: int, field: str) -> None:
    """Raises ValueError unless a model's `field` (= width) is this CLIP's D."""
    if width != self.embed_dim:
      raise ValueError(f"{field}={width}, but the CLIP ({self.source}) gives {self.embed_dim}-"
                       f"wide embeddings: the model was built for another CLIP. Set {field}="
                       f"{self.embed_dim}, or point conditioning.clip_workdir / clip_path at "
                       "the CLIP it was trained with.")

  # ---- traced bodies --------------------------------------------------------
  def _encode_images(self, params, images):
    # pylint: disable-next=g-import-not-at-top
    from diffusion_jax.clip.model import preprocess
    pixels = preprocess(images, self.image_size, self._mean, self._std)
    emb = self.module.apply({"params": params}, pixels, method="encode_image")
    return scaled(emb)

  def _encode_texts(self, params, ids, mask):
    hidden, emb = self.module.apply({"params": params}, ids, mask, method="encode_text")
    return hidden * mask[..., None], scaled(emb)

  # ---- host API ---------------------------------------------------------------
  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """images [N, H, W, C] float in [-1, 1] -> float32 [N, D], scaled (`scaled`)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"The CLIP ({self.source}) embeds [N, H, W, {self.channels}] images; "
                       f"got shape {images.shape}.")
    out = []
    for i in range(0, len(images), _BATCH):
      chunk = images[i:i + _BATCH]
      pad = np.zeros((_BATCH - len(chunk),) + chunk.shape[1:], np.float32)
      emb = self._image_fn(self.params, np.concatenate([chunk, pad]))
      out.append(np.asarray(emb)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def text(self, captions: Sequence) -> dict[str, np.ndarray]:
    """N captions -> `text_tokens` [N, L, W], `text_mask` [N, L], `text_embed` [N, D]."""
    captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
    missing = sorted(set(captions) - set(self._memo))
    for i in range(0, len(missing), _BATCH):
      chunk = missing[i:i + _BATCH]
      ids, mask = self.tokenizer.encode(chunk + [""] * (_BATCH - len(chunk)), self.max_length)
      hidden, emb = (np.asarray(a) for a in self._text_fn(self.params, ids, mask))
      for j, caption in enumerate(chunk):
        self._memo[caption] = (hidden[j], mask[j], emb[j])
    rows = [self._memo[c] for c in captions]
    while len(self._memo) > 100_000:  # captioned sets repeat a few thousand captions
      self._memo.popitem(last=False)
    tokens, mask, emb = (np.stack(a) for a in zip(*rows))
    return {"text_tokens": tokens.astype(np.float32), "text_mask": mask.astype(bool),
            "text_embed": emb.astype(np.float32)}


@functools.lru_cache(maxsize=4)
def _from_workdir(workdir: str) -> FrozenCLIP:
  # pylint: disable-next=g-import-not-at-top  (the run layer imports this module)
  from diffusion_jax import builders, checkpointing
  from diffusion_jax.text.tokenizers import ByteTokenizer
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"conditioning.clip_workdir={workdir!r} holds no config.json: "
                            "train a CLIP there first (configs/shapes_clip.py).")
  config = checkpointing.load_config(workdir)
  if config.model.name != "clip":
    raise ValueError(f"conditioning.clip_workdir={workdir!r} is a model.name="
                     f"{config.model.name!r} run, not a CLIP (model.name='clip').")
  module, params, _, _ = builders.restore_ema(config, workdir)
  params = jax.device_get(params)
  return FrozenCLIP(module, params, ByteTokenizer(), max_length=config.model.clip.context_length,
                    source=f"clip_workdir {workdir}")


@functools.lru_cache(maxsize=4)
def _from_hf(path: str) -> FrozenCLIP:
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.clip import hf_weights
  module, params, _ = hf_weights.load_hf_clip(path)
  tokenizer = hf_weights.hf_clip_tokenizer(path)
  return FrozenCLIP(module, params, tokenizer, max_length=module.context_length,
                    source=f"clip_path {path}", mean=OPENAI_MEAN, std=OPENAI_STD)


def clear_cache() -> None:
  """Forgets the loaded CLIPs (tests that retrain one in the same workdir)."""
  _from_workdir.cache_clear()
  _from_hf.cache_clear()
