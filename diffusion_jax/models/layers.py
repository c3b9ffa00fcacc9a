"""Building blocks of the DDPM U-Net (Ho et al., 2020) and its conditioning hooks.

Every block takes and returns channels-last activations `[B, H, W, C]`. `dtype` is
the compute dtype (float32 or bfloat16); parameters are created in `param_dtype`.
GroupNorm always computes its statistics and the normalisation in float32 (Flax's
`force_float32_reductions`) and casts the result to `dtype`; the attention softmax
also runs in float32 inside `jax.nn.dot_product_attention`.

Initialisation follows the official DDPM TensorFlow code: variance scaling with
`fan_avg` and a uniform distribution for every kernel, zero biases, and the last
layer of each residual branch (ResBlock `conv2`, attention `proj_out`) initialised
to exactly zero (DDPM uses a 1e-10 scale, which is zero in effect), so every block
starts as the identity.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NUM_GROUPS = 32  # GroupNorm groups, as in DDPM (tf.contrib group_norm default).


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's kernel initialiser: variance scaling, fan_avg, uniform."""
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


zero_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding, as DDPM's `get_timestep_embedding`.

  Frequencies are `exp(-log(max_period) * i / (half - 1))` for `i < half = dim // 2`;
  the first half of the output is the sine, the second the cosine (the tensor2tensor
  layout, not the interleaved one of "Attention Is All You Need"). An odd `dim` is
  zero padded.

  Args:
    t: `[B]` timesteps, int or float (not necessarily integral).
    dim: embedding size; at least 4 so that `half - 1 > 0`.
    max_period: the longest period, `10000` as in DDPM.

  Returns:
    `[B, dim]` float32 embedding.
  """
  if t.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got {t.shape}")
  if dim < 4:
    raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_period) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(x: jax.Array, name: str, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
  """GroupNorm(32) with float32 statistics; must be called inside a compact method.

  Raises:
    ValueError: if the channel count cannot be split into 32 groups.
  """
  if x.shape[-1] % NUM_GROUPS:
    raise ValueError(
        f"GroupNorm({NUM_GROUPS}) '{name}' got {x.shape[-1]} channels, which 32 groups "
        "cannot split: use channel counts that are multiples of 32 (U-Net: `ch`).")
  # Two-pass variance (use_fast_variance=False) as TF's group_norm: E[x^2]-E[x]^2
  # loses precision when the mean is large against the spread.
  return nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=1e-6, dtype=dtype,
                      param_dtype=param_dtype, use_fast_variance=False, name=name)(x)


def resolve_heads(channels: int, num_heads: int, head_dim: int) -> int:
  """Number of attention heads for `channels`: `channels // head_dim` if `head_dim > 0`."""
  if head_dim > 0:
    if channels % head_dim:
      raise ValueError(f"head_dim={head_dim} does not divide {channels} attention channels")
    return channels // head_dim
  if num_heads < 1 or channels % num_heads:
    raise ValueError(f"num_heads={num_heads} does not divide {channels} attention channels")
  return num_heads


class TimestepEmbed(nn.Module):
  """Sinusoidal embedding of size `ch` followed by Dense(4 ch) -> swish -> Dense(4 ch).

  Attributes:
    ch: base channel count; the sinusoid has `ch` features, the output `4 * ch`.
    zero_out: zero-initialise the last Dense, so the embedding starts as 0 (an
      input added to a trained model, which then starts as that model).
  """
  ch: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_out: bool = False

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    """Maps `t [B]` to `[B, 4 ch]` in `dtype`."""
    emb = timestep_embedding(t, self.ch).astype(self.dtype)
    dense = lambda name, init: nn.Dense(4 * self.ch, kernel_init=init, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    last_init = zero_init if self.zero_out else default_init()
    return dense("dense1", last_init)(nn.swish(dense("dense0", default_init())(emb)))


class Downsample(nn.Module):
  """Halves H and W: 3x3 conv with stride 2 ('SAME' padding, as DDPM) or 2x2 average pool."""
  with_conv: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C] -> [B, H/2, W/2, C]`."""
    if self.with_conv:
      return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="SAME",
                     kernel_init=default_init(), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """`[B, H, W, C] -> [B, 2H, 2W, C]` by nearest-neighbour repetition."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, optionally followed by a 3x3 conv."""
  with_conv: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C] -> [B, 2H, 2W, C]`."""
    x = upsample_nearest(x)
    if self.with_conv:
      x = nn.Conv(x.shape[-1], (3, 3), kernel_init=default_init(), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="conv")(x)
    return x


class ResBlock(nn.Module):
  """DDPM residual block, optionally resampling (BigGAN style, as improved-diffusion).

  `h = conv1(swish(norm1(x))) + Dense(swish(temb))`, then
  `h = conv2(dropout(swish(norm2(h))))` with `conv2` zero-initialised; the skip is
  a 1x1 conv (`nin_shortcut`) when the channel count changes. With `resample`,
  both branches are resampled (average pool / nearest) after the first activation.

  With `scale_shift_norm` (improved-diffusion's `use_scale_shift_norm`), the
  embedding instead enters after `norm2` as `norm2(h) * (1 + scale) + shift`
  (`temb_proj` is then 2 * out_ch wide). Why: a per-channel constant added
  before a GroupNorm whose groups hold one channel (32 channels in 32 groups)
  is removed again by the normalisation, so a DDPM block at that width cannot
  see the timestep or the conditioning at all.

  Attributes:
    out_ch: output channels.
    dropout: dropout rate before `conv2` (active only when `train`).
    resample: "none", "down" or "up".
    scale_shift_norm: inject `temb` as a scale and shift after `norm2`.
  """
  out_ch: int
  dropout: float = 0.0
  resample: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_shift_norm: bool = False

  def _conv(self, ch: int, name: str, size: int = 3, init=None) -> nn.Conv:
    return nn.Conv(ch, (size, size), kernel_init=init or default_init(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

  def _resample(self, x: jax.Array) -> jax.Array:
    if self.resample == "down":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.resample == "up":
      return upsample_nearest(x)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: `[B, H, W, C]` activations.
      temb: `[B, E]` timestep (plus conditioning) embedding.
      train: enables dropout (needs a 'dropout' rng). Positional so that
        `nn.remat(ResBlock, static_argnums=(3,))` can mark it static.

    Returns:
      `[B, H', W', out_ch]`, `H' = H/2, H, 2H` for down / none / up.
    """
    if self.resample not in ("none", "down", "up"):
      raise ValueError(f"resample must be 'none', 'down' or 'up', got {self.resample!r}")
    x = x.astype(self.dtype)
    h = nn.swish(group_norm(x, "norm1", self.dtype, self.param_dtype))
    h, x = self._resample(h), self._resample(x)
    h = self._conv(self.out_ch, "conv1")(h)
    width = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
    emb = nn.Dense(width, kernel_init=default_init(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="temb_proj")(nn.swish(temb))
    emb = emb[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = group_norm(h, "norm2", self.dtype, self.param_dtype) * (1 + scale) + shift
    else:
      h = group_norm(h + emb, "norm2", self.dtype, self.param_dtype)
    h = nn.swish(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = self._conv(self.out_ch, "conv2", init=zero_init)(h)
    if x.shape[-1] != self.out_ch:
      x = self._conv(self.out_ch, "nin_shortcut", size=1)(x)
    return x + h


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Multi-head attention `[B, T, N, D] x [B, S, N, D] -> [B, T, N, D]`.

  `implementation=None` lets JAX pick (XLA today, on every backend); the cuDNN flash
  kernel ('cudnn') needs bf16/fp16 and is a measured switch for a GPU, not a default.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)


class SelfAttention(nn.Module):
  """Spatial self-attention with a residual connection (DDPM `attn_block`).

  GroupNorm -> q, k, v (each a C -> C projection, DDPM's `nin`) ->
  softmax(q k^T / sqrt(head_dim)) v -> `proj_out` (zero init) -> + x.

  Attributes:
    num_heads: heads, used when `head_dim` is 0. DDPM uses one head.
    head_dim: if > 0, `heads = C // head_dim`.
  """
  num_heads: int = 1
  head_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C] -> [B, H, W, C]`."""
    b, hgt, wid, c = x.shape
    heads = resolve_heads(c, self.num_heads, self.head_dim)
    x = x.astype(self.dtype)
    h = group_norm(x, "norm", self.dtype, self.param_dtype).reshape(b, hgt * wid, c)
    # Three projections rather than one fused Dense(3C): DDPM's fan_avg initial
    # scale depends on each kernel's own fan-out.
    proj = lambda name: nn.DenseGeneral((heads, c // heads), kernel_init=default_init(),
                                        dtype=self.dtype, param_dtype=self.param_dtype,
                                        name=name)
    out = _attend(proj("q")(h), proj("k")(h), proj("v")(h), None)
    out = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=zero_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="proj_out")(out)
    return x + out.reshape(b, hgt, wid, c)


class CrossAttention(nn.Module):
  """Attention from image positions to conditioning tokens (Imagen / GLIDE style).

  Queries come from GroupNorm(x), keys and values from LayerNorm(tokens); the output
  projection is zero-initialised and added to `x`. Masked tokens (mask False) get no
  weight; a row whose tokens are all masked contributes exactly zero, so the block
  is the identity for it (usable as the null condition for classifier-free guidance).

  Attributes:
    num_heads: heads, used when `head_dim` is 0.
    head_dim: if > 0, `heads = C // head_dim`.
  """
  num_heads: int = 1
  head_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Applies the block.

    Args:
      x: `[B, H, W, C]` image activations.
      tokens: `[B, L, D]` conditioning tokens.
      mask: `[B, L]` bool, True where a token may be attended to; None = all.

    Returns:
      `[B, H, W, C]`.
    """
    b, hgt, wid, c = x.shape
    heads = resolve_heads(c, self.num_heads, self.head_dim)
    proj = lambda name: nn.DenseGeneral((heads, c // heads), kernel_init=default_init(),
                                        dtype=self.dtype, param_dtype=self.param_dtype,
                                        name=name)
    x = x.astype(self.dtype)
    h = group_norm(x, "norm", self.dtype, self.param_dtype).reshape(b, hgt * wid, c)
    ctx = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="norm_tokens")(tokens.astype(self.dtype))
    q, k, v = proj("q")(h), proj("k")(ctx), proj("v")(ctx)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = _attend(q, k, v, attn_mask)
    if mask is not None:
      # XLA's attention gives a fully masked row uniform weights over the masked
      # tokens; zero it so masked tokens never reach the output.
      out = out * jnp.any(mask, axis=1)[:, None, None, None].astype(out.dtype)
    out = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=zero_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="proj_out")(out)
    return x + out.reshape(b, hgt, wid, c)
