"""DALL-E 2's diffusion prior: a causal Transformer over CLIP embeddings.

Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with CLIP
Latents", section 2.2 and appendix C) generate a CLIP image embedding from a
caption with a diffusion model whose network is a decoder-only Transformer with
a causal attention mask over the sequence, in order:

  [encoded text tokens (L), CLIP text embedding, timestep embedding,
   noised CLIP image embedding, a learned final query]

The output at the final query is projected to the embedding width D and read
as the prediction (the paper predicts the unnoised embedding; this network does
not know which target the diffusion config chooses).

Here the text tokens are the CLIP text encoder's final token states
`[B, L, text_width]`, each projected by a Dense to `width`; the two CLIP vectors
have their own Dense each; the timestep goes through the shared sinusoidal
embedding (`layers.timestep_embedding`) and a two-layer MLP. Blocks are
pre-LayerNorm (self-attention, then a 4x GELU MLP), followed by a final
LayerNorm, as `TextTransformer`.

Called as the U-Net: `model.apply({'params': p}, x, t, cond, train=...)` with
`cond = {'text_tokens', 'text_mask', 'text_embed'}`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any

NUM_EXTRA = 4  # Sequence positions after the text: text embed, time, noisy x, query.


def attention_mask(text_mask: jax.Array) -> jax.Array:
  """Causal mask combined with the text padding mask.

  Args:
    text_mask: `[B, L]` bool, True for a real text token.

  Returns:
    `[B, 1, S, S]` bool with `S = L + 4`: entry `[b, 0, i, j]` is True when
    position `i` may attend to position `j`, i.e. `j <= i` and `j` is a real
    text token or one of the four positions after the text (always real).
  """
  b, length = text_mask.shape
  s = length + NUM_EXTRA
  causal = jnp.tril(jnp.ones((s, s), bool))
  keys = jnp.concatenate([text_mask, jnp.ones((b, NUM_EXTRA), bool)], axis=1)
  return causal[None, None] & keys[:, None, None, :]


class PriorBlock(nn.Module):
  """Pre-LayerNorm Transformer block: masked self-attention, then a 4x GELU MLP.

  A module of its own so that `capture_intermediates=True` records every
  block's output `[B, S, width]` (the causality test reads them).

  Attributes:
    num_heads: attention heads; must divide the width.
    dropout: rate on both residual branches (only when `train`).
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """`x [B, S, W]`, `mask [B, 1, S, S]` bool -> `[B, S, W]`."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = nn.LayerNorm(name="ln1", **kw)(x)
    h = nn.MultiHeadDotProductAttention(self.num_heads, name="attn", **kw)(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.LayerNorm(name="ln2", **kw)(x)
    h = nn.Dense(4 * width, name="mlp_in", **kw)(h)
    h = nn.Dense(width, name="mlp_out", **kw)(nn.gelu(h))
    return x + nn.Dropout(self.dropout)(h, deterministic=not train)


class PriorTransformer(nn.Module):
  """DALL-E 2 prior network: `(x [B, D], t [B], cond) -> [B, D]` float32.

  Attributes:
    embed_dim: D, the CLIP embedding width (of `x`, `text_embed` and the output).
    text_width: width of the CLIP text token states `cond['text_tokens']`.
    max_text_length: the longest text sequence L (position embeddings).
    width: Transformer width.
    num_layers: Transformer blocks.
    num_heads: attention heads; must divide `width`.
    dropout: residual-branch dropout rate (only when `train`).
    dtype: compute dtype (bfloat16 for mixed precision); the output is float32.
    param_dtype: parameter dtype.
  """
  embed_dim: int = 64
  text_width: int = 64
  max_text_length: int = 72
  width: int = 128
  num_layers: int = 4
  num_heads: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check_fields(self) -> None:
    """Raises ValueError for field values no input could make work."""
    for name in ("embed_dim", "text_width", "max_text_length", "width", "num_layers",
                 "num_heads"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"PriorTransformer.{name} must be an int >= 1, got {v!r}")
    if self.width % self.num_heads:
      raise ValueError(f"PriorTransformer.width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.width < 4:  # the sinusoidal timestep embedding needs >= 4 features
      raise ValueError(f"PriorTransformer.width must be >= 4, got {self.width}")
    for name in ("dtype", "param_dtype"):
      if not jnp.issubdtype(getattr(self, name), jnp.floating):
        raise ValueError(f"PriorTransformer.{name} must be a float dtype, "
                         f"got {getattr(self, name)!r}")

  def _check_inputs(self, x: jax.Array, t: jax.Array,
                    cond: Mapping[str, jax.Array] | None) -> None:
    """Raises ValueError for a missing cond key or a shape that does not fit."""
    missing = sorted({"text_tokens", "text_mask", "text_embed"} - set(cond or {}))
    if missing:
      raise ValueError(f"PriorTransformer needs cond keys {missing}: 'text_tokens' "
                       "[B, L, text_width], 'text_mask' [B, L] bool, 'text_embed' [B, D]")
    d = self.embed_dim
    if x.ndim != 2 or x.shape[1] != d:
      raise ValueError(f"x must be [B, embed_dim={d}], got {x.shape}")
    b = x.shape[0]
    if t.shape != (b,):
      raise ValueError(f"t must be [B={b}], got {t.shape}")
    tokens, mask, embed = cond["text_tokens"], cond["text_mask"], cond["text_embed"]
    if (tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[1] > self.max_text_length
        or tokens.shape[2] != self.text_width):
      raise ValueError(f"cond['text_tokens'] must be [B={b}, L<={self.max_text_length}, "
                       f"text_width={self.text_width}], got {tokens.shape}")
    if mask.shape != tokens.shape[:2] or mask.dtype != jnp.bool_:
      raise ValueError(f"cond['text_mask'] must be bool {tokens.shape[:2]} (True = real "
                       f"token), got {mask.dtype} {mask.shape}")
    if embed.shape != (b, d):
      raise ValueError(f"cond['text_embed'] must be [B={b}, embed_dim={d}], got {embed.shape}")

  def _time_embed(self, t: jax.Array) -> jax.Array:
    """`t [B]` -> `[B, width]`: sinusoid of `width` features -> Dense -> swish -> Dense."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = layers.timestep_embedding(t, self.width).astype(self.dtype)
    emb = nn.swish(nn.Dense(self.width, name="time_dense0", **kw)(emb))
    return nn.Dense(self.width, name="time_dense1", **kw)(emb)

  def _sequence(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
    """The input sequence `[B, L + 4, width]`, position embeddings added."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = cond["text_mask"]
    # Zero padded token states before they enter: the attention mask already hides
    # them, but a NaN or inf there would still poison the masked weighted sum.
    tokens = jnp.where(mask[..., None], cond["text_tokens"], 0).astype(self.dtype)
    tokens = nn.Dense(self.width, name="text_tokens_proj", **kw)(tokens)
    text_embed = nn.Dense(self.width, name="text_embed_proj", **kw)(
        cond["text_embed"].astype(self.dtype))
    x_embed = nn.Dense(self.width, name="x_proj", **kw)(x.astype(self.dtype))
    query = self.param("final_query", nn.initializers.normal(0.01), (self.width,),
                       self.param_dtype)
    query = jnp.broadcast_to(query.astype(self.dtype), x_embed.shape)
    extra = jnp.stack([text_embed, self._time_embed(t), x_embed, query], axis=1)
    pos = self.param("pos_emb", nn.initializers.normal(0.01),
                     (self.max_text_length + NUM_EXTRA, self.width), self.param_dtype)
    pos = pos.astype(self.dtype)
    # The four positions after the text always take the last four rows, whatever L
    # is, so a caption's prediction does not depend on how far its batch is padded.
    length = tokens.shape[1]
    tokens = tokens + pos[:length]
    extra = extra + pos[self.max_text_length:]
    return jnp.concatenate([tokens, extra], axis=1)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None,
               *, train: bool = False) -> jax.Array:
    """Predicts from the noisy CLIP image embedding.

    Args:
      x: `[B, D]` noisy (scaled) CLIP image embedding, `D = embed_dim`.
      t: `[B]` int32 timesteps.
      cond: `'text_tokens'` `[B, L, text_width]` float (CLIP text encoder final
        token states, `L <= max_text_length`), `'text_mask'` `[B, L]` bool (True =
        real token; padded tokens are never attended to), `'text_embed'` `[B, D]`
        float (the CLIP text embedding).
      train: enables dropout (needs a 'dropout' rng when `dropout > 0`).

    Returns:
      `[B, D]` float32, read at the final query position.

    Raises:
      ValueError: for bad fields, a missing cond key or mismatched shapes.
    """
    self._check_fields()
    self._check_inputs(x, t, cond)
    h = self._sequence(x, t, cond)
    mask = attention_mask(cond["text_mask"])
    for i in range(self.num_layers):
      h = PriorBlock(self.num_heads, self.dropout, self.dtype, self.param_dtype,
                     name=f"block_{i}")(h, mask, train)
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(h)
    out = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="out_proj")(h[:, -1])
    return out.astype(jnp.float32)
