"""A CLIP-style contrastive text-image model in Flax, laid out as HF `CLIPModel`.

`CLIP` is HF `CLIPModel` without dropout, module for module, so that loading a HF
checkpoint is a renaming (`hf_weights.hf_name`):

* vision: a patch convolution (no bias), a class embedding prepended to the patches,
  learned position embeddings, `pre_layrnorm` (HF's spelling), pre-LN transformer
  layers, `post_layernorm` of the class token, `visual_projection` (no bias);
* text: token + position embeddings, pre-LN transformer layers with causal
  self-attention (combined with the padding mask), `final_layer_norm`, the state at
  the end-of-text token, `text_projection` (no bias);
* `logit_scale`, a scalar initialised to log(1 / 0.07).

Images are NHWC here (HF's pixel_values are NCHW); `preprocess` turns the project's
[-1, 1] images into the model's input.
"""
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# HF's processor statistics for the OpenAI CLIP checkpoints (on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU (HF "quick_gelu")."""
  return x * jax.nn.sigmoid(1.702 * x)


# HF hidden_act -> function. HF's "gelu" is the exact erf GELU, not Flax's tanh default.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def _layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance as torch's LayerNorm (see text.bert._layer_norm).
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class _Attention(nn.Module):
  """HF `CLIPAttention`: q/k/v/out projections with bias, softmax(q k^T / sqrt(d)) v."""
  num_heads: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`[B, L, D]`, `[B, 1, L, L]` bool (True = may attend) or None -> `[B, L, D]`."""
    b, length, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide the width {d}")
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(b, length, self.num_heads, d // self.num_heads)
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return dense("out_proj")(out.reshape(b, length, d))


class _MLP(nn.Module):
  """HF `CLIPMLP`: fc2(act(fc1(x)))."""
  hidden: int
  act: str
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    return dense(x.shape[-1], "fc2")(ACTIVATIONS[self.act](dense(self.hidden, "fc1")(x)))


class _EncoderLayer(nn.Module):
  """One pre-LN layer: `x += Attn(LN1(x)); x += MLP(LN2(x))` (HF `CLIPEncoderLayer`)."""
  num_heads: int
  mlp_dim: int
  act: str
  eps: float
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    norm = lambda name: _layer_norm(self.eps, name, self.dtype, self.param_dtype)
    x = x + _Attention(self.num_heads, self.dtype, self.param_dtype, name="self_attn")(
        norm("layer_norm1")(x), mask)
    return x + _MLP(self.mlp_dim, self.act, self.dtype, self.param_dtype, name="mlp")(
        norm("layer_norm2")(x))


@dataclasses.dataclass(frozen=True)
class _Tower:
  """What a tower's layers need (a plain value, so modules can hold it as a field)."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str
  eps: float
  dtype: Dtype
  param_dtype: Dtype

  def norm(self, name: str) -> nn.LayerNorm:
    return _layer_norm(self.eps, name, self.dtype, self.param_dtype)

  def encoder(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The layers, named `layers_{i}` (HF `encoder.layers.{i}`) in the calling module."""
    for i in range(self.layers):
      x = _EncoderLayer(self.heads, self.mlp_dim, self.act, self.eps, self.dtype,
                        self.param_dtype, name=f"layers_{i}")(x, mask)
    return x


class _VisionEmbeddings(nn.Module):
  """HF `CLIPVisionEmbeddings`: [class; patches] + position embeddings."""
  width: int
  patch_size: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, 1 + (H/p)(W/p), width]`, patches in row-major order."""
    p = self.patch_size
    patches = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name="patch_embedding")(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, self.width)  # (row, column) order, as HF's flatten
    cls = self.param("class_embedding", nn.initializers.normal(self.width ** -0.5),
                     (self.width,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, self.width)),
                         patches], axis=1)
    pos = nn.Embed(x.shape[1], self.width, embedding_init=nn.initializers.normal(0.02),
                   dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding")
    return x + pos(jnp.arange(x.shape[1]))[None]


class _TextEmbeddings(nn.Module):
  """HF `CLIPTextEmbeddings`: token + absolute position embeddings."""
  vocab_size: int
  context_length: int
  width: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    embed = lambda n, name: nn.Embed(n, self.width, embedding_init=nn.initializers.normal(0.02),
                                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return (embed(self.vocab_size, "token_embedding")(ids)
            + embed(self.context_length, "position_embedding")(jnp.arange(ids.shape[1]))[None])


class _VisionTower(nn.Module):
  """HF `CLIPVisionTransformer`; returns the post-LN class token `[B, width]`."""
  tower: _Tower
  patch_size: int

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    t = self.tower
    x = _VisionEmbeddings(t.width, self.patch_size, t.dtype, t.param_dtype,
                          name="embeddings")(pixels.astype(t.dtype))
    x = t.encoder(t.norm("pre_layrnorm")(x), None)
    return t.norm("post_layernorm")(x[:, 0])


class _TextTower(nn.Module):
  """HF `CLIPTextTransformer`; returns final-LN states `[B, L, width]` and the pooled."""
  tower: _Tower
  vocab_size: int
  context_length: int

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = self.tower
    x = _TextEmbeddings(self.vocab_size, self.context_length, t.width, t.dtype,
                        t.param_dtype, name="embeddings")(ids)
    length = ids.shape[1]
    # Causal AND key padding, as HF (causal_attention_mask + attention_mask). A padded
    # query still sees the real tokens before it, so no row is empty.
    causal = jnp.tril(jnp.ones((length, length), bool))
    attn_mask = causal[None, None] & mask[:, None, None, :]
    x = t.norm("final_layer_norm")(t.encoder(x, attn_mask))
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return x, x[jnp.arange(x.shape[0]), last]


class CLIP(nn.Module):
  """CLIP (HF `CLIPModel`): image and text towers projected to a shared space.

  The defaults are a small model for the offline shapes data set, with the
  project's `ByteTokenizer` (259 ids). `hf_weights.load_hf_clip` builds one from a
  HF checkpoint.

  Attributes:
    embed_dim: `E`, the shared embedding width (HF `projection_dim`).
    image_size, patch_size, image_channels: input images `[B, S, S, C]`, `S % p == 0`.
    vision_width, vision_layers, vision_heads: the vision transformer.
    vocab_size, context_length: token ids `< vocab_size`, sequences `<= context_length`.
    text_width, text_layers, text_heads: the text transformer.
    vision_mlp_dim, text_mlp_dim: MLP hidden sizes; None = 4 x width (HF, OpenAI).
    act: MLP activation, "quick_gelu" (OpenAI CLIP) or "gelu" (exact erf).
    layer_norm_eps: epsilon of every LayerNorm.
    logit_scale_init: initial `logit_scale` (HF `logit_scale_init_value`).
    dtype: compute dtype; outputs are float32, params `param_dtype`.
  """
  embed_dim: int = 64
  image_size: int = 32
  patch_size: int = 4
  image_channels: int = 3
  vision_width: int = 64
  vision_layers: int = 2
  vision_heads: int = 4
  vocab_size: int = 259
  context_length: int = 72
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  vision_mlp_dim: int | None = None
  text_mlp_dim: int | None = None
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  logit_scale_init: float = math.log(1 / 0.07)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _tower(self, width: int, layers: int, heads: int, mlp_dim: int | None) -> _Tower:
    return _Tower(width, layers, heads, mlp_dim or 4 * width, self.act, self.layer_norm_eps,
                  self.dtype, self.param_dtype)

  def setup(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act={self.act!r}; CLIP implements {sorted(ACTIVATIONS)}")
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} does not divide "
                       f"image_size={self.image_size}")
    self.vision_model = _VisionTower(
        self._tower(self.vision_width, self.vision_layers, self.vision_heads,
                    self.vision_mlp_dim), self.patch_size)
    self.text_model = _TextTower(
        self._tower(self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim),
        self.vocab_size, self.context_length)
    dense = lambda: nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    self.visual_projection = dense()
    self.text_projection = dense()
    self.logit_scale = self.param(
        "logit_scale", lambda _: jnp.asarray(self.logit_scale_init, self.param_dtype))

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """Image embeddings, unnormalised (HF `get_image_features`).

    Args:
      pixels: `[B, image_size, image_size, image_channels]`, already preprocessed
        (`preprocess`).

    Returns:
      `[B, embed_dim]` float32.
    """
    want = (self.image_size, self.image_size, self.image_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
      raise ValueError(f"pixels must be [B, {', '.join(map(str, want))}] (NHWC); "
                       f"got {tuple(pixels.shape)}")
    return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Text states and embeddings.

    The pooled state is the one at the LAST real token, position `sum(mask) - 1`.
    HF's CLIP tokenizer ends every caption with <|endoftext|>, so this is the
    end-of-text state that HF pools, whether the padding is <|endoftext|> (OpenAI
    checkpoints: HF takes the first eos) or another id; it needs right padding.

    Args:
      ids: `[B, L]` int32 token ids, `L <= context_length`.
      mask: `[B, L]` bool, True for real tokens, left-aligned (right padding).

    Returns:
      `(hidden, embeds)`: `[B, L, text_width]` final-LayerNorm token states (HF
      `last_hidden_state`) and `[B, embed_dim]` unnormalised text embeddings (HF
      `get_text_features`), both float32.
    """
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
    if ids.shape[1] > self.context_length:
      raise ValueError(f"sequence length {ids.shape[1]} exceeds context_length="
                       f"{self.context_length}: tokenize with a smaller max_length")
    hidden, pooled = self.text_model(ids, mask.astype(bool))
    return hidden.astype(jnp.float32), self.text_projection(pooled).astype(jnp.float32)

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(image_embeds [B, E], text_embeds [B', E], logit_scale [])`, unnormalised.

    `loss.contrastive_loss` takes these three; `logit_scale` is the raw parameter
    (the logits are scaled by its exp).
    """
    _, text_embeds = self.encode_text(ids, mask)
    return self.encode_image(pixels), text_embeds, self.logit_scale.astype(jnp.float32)


def preprocess(images: jax.Array, image_size: int, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> jax.Array:
  """The project's images -> CLIP input pixels.

  A non-square image is centre-cropped to a square first, then resized (bicubic,
  antialiased) to `image_size`. HF's `CLIPImageProcessor` resizes the shortest side
  with PIL's bicubic filter and then centre-crops, in uint8, so pixels match it
  only approximately, and most closely for square inputs.

  Args:
    images: `[B, H, W, C]` float in [-1, 1].
    image_size: output side `S`.
    mean, std: per-channel statistics on [0, 1] pixels (e.g. `CLIP_MEAN`, `CLIP_STD`
      for the OpenAI checkpoints): the output is `((x + 1) / 2 - mean) / std`. Both
      None (for models trained here) keeps [-1, 1].

  Returns:
    `[B, S, S, C]` float32.
  """
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std, or neither")
  x = jnp.asarray(images, jnp.float32)
  b, h, w, c = x.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[:, top:top + side, left:left + side]
  if side != image_size:
    x = jax.image.resize(x, (b, image_size, image_size, c), "bicubic", antialias=True)
  if mean is None:
    return x
  return ((x + 1) / 2 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
