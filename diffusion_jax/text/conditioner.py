"""Captions -> the arrays a text-conditioned model takes, on the host.

Two kinds (`config.conditioning.text_encoder`):

* "trained" (GLIDE): the caption's byte ids and mask, `text_ids` [B, L] int32
  and `text_mask` [B, L] bool (L = model.text_max_length); the model's own
  TextTransformer encodes them inside the train step and learns with it.
* "frozen" (Imagen): a pretrained encoder (all-MiniLM-L6-v2 by default, D =
  384, or the BERT or T5 checkpoint directory `conditioning.frozen_encoder_path`,
  see `FrozenTextEncoder.pretrained`) runs outside the train step, so it has
  no gradients and no optimizer state; its outputs `tokens` [B, L, D], `mask`
  [B, L] and `vector` [B, D] go into the batch. Each distinct caption is
  encoded once and kept in an LRU cache of `conditioning.text_cache_size`
  captions (a captioned data set repeats its captions every epoch).

The null text of classifier-free guidance is the empty caption, encoded the
same way (`null`).
"""
from __future__ import annotations

import collections
from typing import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.text.tokenizers import ByteTokenizer

KINDS = ("trained", "frozen")
_ENCODE_BATCH = 64  # Frozen encoder calls use this fixed batch: one compile.


def _decode(captions) -> list[str]:
  return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]


class TextConditioner:
  """Turns captions into the text conditioning of `config`'s model (host numpy)."""

  def __init__(self, config: ml_collections.ConfigDict):
    c, m = config.conditioning, config.model
    self.kind = c.text_encoder
    if self.kind not in KINDS:
      raise ValueError(f"conditioning.text_encoder={self.kind!r}; valid: {KINDS}.")
    if self.kind == "trained":
      self._tokenizer, self.max_length = ByteTokenizer(), m.text_max_length
      if m.text_vocab_size != self._tokenizer.vocab_size:
        raise ValueError(f"model.text_vocab_size={m.text_vocab_size}, but the byte tokenizer "
                         f"has {self._tokenizer.vocab_size} ids; set it to that.")
      return
    # pylint: disable-next=g-import-not-at-top  (needs the optional `text` extra)
    from diffusion_jax.text import FrozenTextEncoder
    self.max_length = c.text_max_length
    self._encoder = FrozenTextEncoder.pretrained(
        c.frozen_encoder_path or None, max_length=self.max_length,
        dtype=c.frozen_encoder_dtype)
    width = self._encoder.module.config.hidden_size
    if m.cross_attn_dim != width or m.cond_vector_dim != width:
      raise ValueError(
          f"The frozen text encoder ({c.frozen_encoder_path or 'all-MiniLM-L6-v2'}) gives "
          f"{width}-wide embeddings, but model.cross_attn_dim={m.cross_attn_dim} and "
          f"model.cond_vector_dim={m.cond_vector_dim}; set both to {width}.")
    # Least recently used captions are evicted beyond `text_cache_size` entries
    # (24 x 384 floats = 37 KB each for all-MiniLM-L6-v2 at 24 tokens).
    self._memo: collections.OrderedDict[str, tuple] = collections.OrderedDict()
    self._cache_size = c.text_cache_size

  def __call__(self, captions: Sequence) -> dict[str, np.ndarray]:
    """Text conditioning for B captions (str or bytes): a dict of [B, ...] arrays."""
    captions = _decode(captions)
    if self.kind == "trained":
      ids, mask = self._tokenizer.encode(captions, self.max_length)
      return {"text_ids": ids.astype(np.int32), "text_mask": mask.astype(bool)}
    found = self._encode_missing(captions)
    tokens, mask, pooled = (np.stack(a) for a in zip(*(found[c] for c in captions)))
    return {"tokens": tokens, "mask": mask, "vector": pooled}

  def null(self, batch_size: int) -> dict[str, np.ndarray]:
    """The empty caption's conditioning, repeated: the null text of guidance."""
    return self([""] * batch_size)

  def shapes(self, batch_size: int) -> dict[str, jnp.ndarray]:
    """Zeros of the conditioning's shapes and dtypes (to initialise a model)."""
    return {k: jnp.zeros_like(v) for k, v in self.null(batch_size).items()}

  def _encode_missing(self, captions: list[str]) -> dict[str, tuple]:
    """The encodings of `captions` (from the cache, or computed and cached)."""
    found = {}
    for c in set(captions) & set(self._memo):
      self._memo.move_to_end(c)
      found[c] = self._memo[c]
    missing = sorted(set(captions) - set(found))
    for i in range(0, len(missing), _ENCODE_BATCH):
      chunk = missing[i:i + _ENCODE_BATCH]
      padded = chunk + [""] * (_ENCODE_BATCH - len(chunk))
      out = self._encoder(padded)
      tokens, mask, pooled = (np.asarray(a) for a in (out.tokens, out.mask, out.pooled))
      for j, caption in enumerate(chunk):
        found[caption] = self._memo[caption] = (tokens[j], mask[j], pooled[j])
    while len(self._memo) > self._cache_size:
      self._memo.popitem(last=False)
    return found
