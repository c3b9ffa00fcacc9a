"""GLIDE-style text conditioning: a transformer trained jointly with the U-Net.

GLIDE (Nichol et al. 2021) encodes the caption with a transformer whose
parameters are trained with the diffusion model. Its final token states
condition the U-Net's attention layers, and one pooled state is added to the
timestep embedding. Here:

* `TextTransformer`: token + learned position embeddings, pre-LayerNorm
  blocks (bidirectional self-attention under the padding mask, GELU MLP), a
  final LayerNorm. The pooled state is the mean over real tokens (GLIDE takes
  the last token of a causal transformer; with a bidirectional encoder the
  masked mean sees the whole caption too).
* `TextUNet`: `(x, t, cond)` with `cond['text_ids'] [B, L]` int32 and
  `cond['text_mask'] [B, L]` bool; it runs the transformer and hands the UNet
  `tokens` (cross-attention, masked) and `vector` (the pooled state).

GLIDE concatenates projected text tokens to the keys and values of each
self-attention layer, so image and text positions share one softmax. This
codebase uses separate cross-attention blocks after the self-attention (as
Imagen): the image queries read the same text keys and values, normalised
over the text alone. It is not the same function (the joint softmax lets
text and image positions compete for weight), but it carries the same
information to the same resolutions, and it is what Imagen found to work
with both trained and frozen encoders; we implement only this form.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.unet import UNet

Dtype = Any


class TextTransformer(nn.Module):
  """Caption ids `[B, L]` -> `(tokens [B, L, width], pooled [B, width])` float32.

  Attributes:
    vocab_size: token ids lie in [0, vocab_size).
    max_length: L, the longest caption (position embeddings).
    width: model width (and the output width D).
    num_layers: transformer blocks.
    num_heads: attention heads; must divide `width`.
  """
  vocab_size: int
  max_length: int
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    if ids.ndim != 2 or ids.shape[1] > self.max_length or mask.shape != ids.shape:
      raise ValueError(f"text ids and mask must be [B, L <= {self.max_length}], got "
                       f"{ids.shape} and {mask.shape}")
    if self.width % self.num_heads:
      raise ValueError(f"text width {self.width} is not divisible by {self.num_heads} heads")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width, name="token_emb", **kw)(ids)
    pos = self.param("pos_emb", nn.initializers.normal(0.01),
                     (self.max_length, self.width), self.param_dtype)
    x = x + pos[:ids.shape[1]].astype(x.dtype)
    attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]: keys that may be attended to
    for i in range(self.num_layers):
      h = nn.LayerNorm(name=f"block_{i}_ln1", **kw)(x)
      x = x + nn.MultiHeadDotProductAttention(
          self.num_heads, name=f"block_{i}_attn", **kw)(h, h, mask=attn_mask)
      h = nn.LayerNorm(name=f"block_{i}_ln2", **kw)(x)
      h = nn.Dense(4 * self.width, name=f"block_{i}_mlp_in", **kw)(h)
      x = x + nn.Dense(self.width, name=f"block_{i}_mlp_out", **kw)(nn.gelu(h))
    x = nn.LayerNorm(name="ln_final", **kw)(x).astype(jnp.float32)
    m = mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return x * m, pooled


class TextUNet(nn.Module):
  """A U-Net conditioned on a caption through a jointly trained `TextTransformer`.

  Called as the UNet, `(x, t, cond, train=...)`; `cond` holds `text_ids` and
  `text_mask` instead of `tokens` / `mask` / `vector`, plus any other key the
  UNet was built for (`label`, `low_res`, `aug_level`).
  """
  unet: UNet
  text: TextTransformer

  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None,
               *, train: bool) -> jax.Array:
    cond = dict(cond or {})
    if "text_ids" not in cond or "text_mask" not in cond:
      raise ValueError("A text U-Net needs cond['text_ids'] [B, L] int32 and "
                       "cond['text_mask'] [B, L] bool (the empty caption for the null text).")
    mask = cond.pop("text_mask").astype(bool)
    tokens, pooled = self.text(cond.pop("text_ids"), mask)
    cond.update(tokens=tokens, mask=mask, vector=pooled)
    return self.unet(x, t, cond, train=train)
