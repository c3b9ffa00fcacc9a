"""The DDPM U-Net (Ho et al., 2020) with conditioning hooks and accelerator options.

With its defaults, `UNet()` is the DDPM CIFAR-10 network (35,746,307 parameters for
3 input and 3 output channels, the same count as the official TensorFlow code
`diffusion_tf/models/unet.py`). Parameter names follow that code
(`down_0/block_1` -> `down_0_block_1`, `mid/attn_1` -> `mid_attn_1`, ...).

Conditioning (all off by default; an unconditional model has no conditioning
parameters and takes `cond=None`). `cond` is a dict with the keys the model was built
for, and no others:

* `'label'`: `[B]` int32 in `{0, ..., num_classes}`; `num_classes` itself is the
  reserved null class for classifier-free guidance. A class model called without a
  label is an error: callers pass the null class explicitly (e.g.
  `jnp.full([B], num_classes)`), so a forgotten label never silently means
  "unconditional". Out-of-range labels cannot be checked inside `jit`; `jnp.take`
  turns them into NaN embeddings.
* `'vector'`: `[B, cond_vector_dim]` float, e.g. a pooled text embedding; projected
  by a Dense and added to the timestep embedding (GLIDE style).
* `'tokens'`: `[B, L, cross_attn_dim]` float, attended to by cross-attention blocks
  at `cross_attn_resolutions` (Imagen style); `'mask'`: optional `[B, L]` bool, True
  = attend. A row with every token masked gets zero cross-attention output, which
  makes an all-False mask a null condition.
* `'low_res'`: `[B, h, w, low_res_channels]` float, the (augmented) low-resolution
  image of a super-resolution stage; upsampled to H x W (`low_res_upsample`) and
  concatenated with x as input channels (CDM / GLIDE / Imagen). `'aug_level'`:
  `[B]` int32, its noise-augmentation level (superres.py), embedded like a
  timestep and added to the timestep embedding. Both are needed together.
* `'guidance'`: `[B]` float, a classifier-free guidance scale as an input (a
  guidance-distilled student, Meng et al. 2023, distill/guided.py); embedded like a
  timestep of `GUIDANCE_EMBED_SCALE` times the scale, through a zero-initialised
  last layer, and added to the timestep embedding.

Resolutions (`attn_resolutions`, `cross_attn_resolutions`) are feature-map heights
inside the U-Net, i.e. after the `patch_size` space-to-depth stem; sizes that do
not occur are ignored, as in DDPM (except that cross-attention must occur
somewhere, or the tokens would be silently unused).
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import superres
from diffusion_jax.models import layers

Dtype = Any
# Guidance scales (about 0-10) spread like timesteps (0-1000) over the sinusoid's periods.
GUIDANCE_EMBED_SCALE = 100.0

# Lifted once at import: `train` (argument 3, counting `self`) is a Python bool
# that selects dropout, so it must be static under jax.checkpoint.
_RematResBlock = nn.remat(layers.ResBlock, static_argnums=(3,))
_RematSelfAttention = nn.remat(layers.SelfAttention)
_RematCrossAttention = nn.remat(layers.CrossAttention)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """`[B, H, W, C] -> [B, H/p, W/p, p*p*C]`; each output pixel holds a p x p patch."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """Inverse of `space_to_depth`: `[B, H, W, p*p*C] -> [B, p*H, p*W, C]`."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def _check_fields(m: "UNet") -> None:
  """Raises ValueError for field values no input could make work."""
  ints = dict(ch=m.ch, num_res_blocks=m.num_res_blocks, patch_size=m.patch_size)
  for name, v in ints.items():
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"UNet.{name} must be an int >= 1, got {v!r}")
  nonneg = dict(head_dim=m.head_dim, out_channels=m.out_channels, num_classes=m.num_classes,
                cond_vector_dim=m.cond_vector_dim, cross_attn_dim=m.cross_attn_dim,
                low_res_channels=m.low_res_channels, image_embed_dim=m.image_embed_dim,
                image_embed_tokens=m.image_embed_tokens)
  for name, v in nonneg.items():
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"UNet.{name} must be an int >= 0, got {v!r}")
  if m.ch % layers.NUM_GROUPS:
    raise ValueError(
        f"UNet.ch={m.ch}: GroupNorm({layers.NUM_GROUPS}) cannot split the {m.ch} channels "
        "of conv_in (normalised first in down_0_block_0/norm1); every channel count in "
        "the U-Net is a sum of multiples of ch, so use ch divisible by 32.")
  if not m.ch_mult or any(not isinstance(k, int) or k < 1 for k in m.ch_mult):
    raise ValueError(f"UNet.ch_mult must be a non-empty tuple of ints >= 1, got {m.ch_mult!r}")
  for name in ("attn_resolutions", "cross_attn_resolutions"):
    if any(not isinstance(r, int) or r < 1 for r in getattr(m, name)):
      raise ValueError(f"UNet.{name} must hold ints >= 1, got {getattr(m, name)!r}")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"UNet.dropout must be in [0, 1), got {m.dropout!r}")
  if m.head_dim == 0 and m.num_heads < 1:
    raise ValueError(f"UNet.num_heads must be >= 1 when head_dim is 0, got {m.num_heads}")
  if bool(m.cross_attn_dim) != bool(m.cross_attn_resolutions):
    raise ValueError(
        "UNet.cross_attn_dim > 0 and a non-empty cross_attn_resolutions go together; got "
        f"cross_attn_dim={m.cross_attn_dim}, cross_attn_resolutions={m.cross_attn_resolutions}")
  if m.image_embed_dim and m.image_embed_tokens and not m.cross_attn_dim:
    raise ValueError(f"UNet.image_embed_tokens={m.image_embed_tokens} makes cross-attention "
                     "tokens of the image embedding: set cross_attn_dim and "
                     "cross_attn_resolutions, or image_embed_tokens=0")
  if m.low_res_upsample not in superres.UPSAMPLE_METHODS:
    raise ValueError(f"UNet.low_res_upsample must be one of {superres.UPSAMPLE_METHODS}, "
                     f"got {m.low_res_upsample!r}")
  for name in ("dtype", "param_dtype"):
    if not jnp.issubdtype(getattr(m, name), jnp.floating):
      raise ValueError(f"UNet.{name} must be a float dtype, got {getattr(m, name)!r}")


class UNet(nn.Module):
  """DDPM U-Net: `(x [B,H,W,C], t [B], cond) -> [B,H,W,out_channels]` float32.

  Attributes:
    ch: base channels (multiple of 32 for GroupNorm(32)); the timestep embedding is
      `4 * ch` wide.
    ch_mult: channel multiplier per level; the U-Net has `len(ch_mult)` levels and
      downsamples `len(ch_mult) - 1` times.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map heights (inside the U-Net) with self-attention
      after each ResBlock. The middle always has one attention block (DDPM).
    dropout: dropout rate in every ResBlock, active when `train=True`.
    num_heads: attention heads, used when `head_dim` is 0.
    head_dim: if > 0, heads = channels // head_dim at each attention block.
    resblock_updown: resample with ResBlocks (BigGAN style) instead of
      Downsample / Upsample.
    conv_resample: Downsample / Upsample with a 3x3 conv (else average pool /
      plain nearest upsampling).
    out_channels: output channels; 0 means the input's channel count.
    patch_size: space-to-depth stem; the U-Net runs at `H / patch_size` with
      `patch_size**2 * C` input channels, and the output is mapped back.
    dtype: compute dtype (bfloat16 for mixed precision); the output is float32.
    param_dtype: parameter dtype.
    remat: rematerialise each ResBlock and attention block in the backward pass.
    num_classes: > 0 adds a class embedding of `num_classes + 1` rows (the last is
      the null class).
    cond_vector_dim: > 0 adds a projected `[B, cond_vector_dim]` vector input.
    cross_attn_dim: > 0 adds cross-attention to `[B, L, cross_attn_dim]` tokens.
    cross_attn_resolutions: feature-map heights with cross-attention.
    low_res_channels: > 0 makes a super-resolution model: takes `cond['low_res']`
      with this many channels and `cond['aug_level']`.
    low_res_upsample: how `low_res` is resized to the input size ("nearest",
      "bilinear", "bicubic").
    image_embed_dim: > 0 makes an unCLIP decoder: takes `cond['image_embed']`
      `[B, image_embed_dim]`, projected and added to the timestep embedding and
      (DALL-E 2) projected to `image_embed_tokens` extra cross-attention tokens,
      after the text tokens if the model also takes `cond['tokens']`.
    image_embed_tokens: the number of those tokens (0: the embedding only
      enters the timestep embedding).
    guidance_embed: takes `cond['guidance']`, the guidance scale (zero-initialised
      embedding: a copied conditional teacher starts unchanged).
    scale_shift_norm: ResBlocks take the embedding as a scale and shift after
      their second GroupNorm (improved-diffusion); needed for the embedding to
      reach levels of 32 channels (layers.ResBlock).
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_heads: int = 1
  head_dim: int = 0
  resblock_updown: bool = False
  conv_resample: bool = True
  out_channels: int = 0
  patch_size: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  num_classes: int = 0
  cond_vector_dim: int = 0
  cross_attn_dim: int = 0
  cross_attn_resolutions: tuple[int, ...] = ()
  low_res_channels: int = 0
  low_res_upsample: str = "bilinear"
  scale_shift_norm: bool = False
  image_embed_dim: int = 0
  image_embed_tokens: int = 0
  guidance_embed: bool = False

  def __post_init__(self):
    _check_fields(self)  # At build time, before any input is seen.
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None = None,
               *, train: bool) -> jax.Array:
    """Predicts the network output (eps, x0 or v: the caller decides) for `x` at `t`.

    Args:
      x: `[B, H, W, C]` float images; H and W divisible by
        `patch_size * 2**(len(ch_mult) - 1)`.
      t: `[B]` int32 (or float) timesteps.
      cond: None or a dict with the keys this model was built for (module docstring).
      train: enables dropout; needs `rngs={'dropout': key}` when `dropout > 0`.

    Returns:
      `[B, H, W, out_channels]` float32 (`out_channels = C` when the field is 0).

    Raises:
      ValueError: for shapes the U-Net cannot divide, attention channels the heads
        cannot split, or `cond` that does not match the conditioning built in.
    """
    t = jnp.asarray(t)
    cond = dict(cond or {})
    self._check_input(x, t, cond)
    out_ch = self.out_channels or x.shape[-1]
    temb = self._embed(t, cond)
    ctx = self._context(cond) if self.cross_attn_dim else None
    h = x.astype(self.dtype)
    if self.low_res_channels:  # super-resolution: the upsampled image as extra channels
      low = superres.upsample(cond["low_res"], x.shape[1], self.low_res_upsample)
      h = jnp.concatenate([h, low.astype(self.dtype)], axis=-1)
    h = space_to_depth(h, self.patch_size)
    h = nn.Conv(self.ch, (3, 3), kernel_init=layers.default_init(), dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv_in")(h)
    h, skips = self._down(h, temb, ctx, train)
    h = self._mid(h, temb, ctx, train)
    h = self._up(h, skips, temb, ctx, train)
    h = nn.swish(layers.group_norm(h, "norm_out", self.dtype, self.param_dtype))
    h = nn.Conv(out_ch * self.patch_size**2, (3, 3), kernel_init=layers.zero_init,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(h)
    return depth_to_space(h, self.patch_size).astype(jnp.float32)

  # ---- Pieces of __call__ (submodules are created inside its compact scope) ----

  def _embed(self, t: jax.Array, cond: dict) -> jax.Array:
    """Timestep embedding plus label / vector conditioning: `[B, 4 ch]`."""
    temb = layers.TimestepEmbed(self.ch, self.dtype, self.param_dtype, name="temb")(t)
    if self.num_classes:
      temb += nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="label_emb")(cond["label"])
    if self.cond_vector_dim:
      temb += nn.Dense(4 * self.ch, kernel_init=layers.default_init(), dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       name="vector_proj")(cond["vector"].astype(self.dtype))
    if self.image_embed_dim:
      temb += nn.Dense(4 * self.ch, kernel_init=layers.default_init(), dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       name="image_embed_proj")(cond["image_embed"].astype(self.dtype))
    if self.low_res_channels:
      temb += layers.TimestepEmbed(self.ch, self.dtype, self.param_dtype,
                                   name="aug_emb")(cond["aug_level"])
    if self.guidance_embed:
      temb += layers.TimestepEmbed(self.ch, self.dtype, self.param_dtype, zero_out=True,
                                   name="guidance_emb")(GUIDANCE_EMBED_SCALE * cond["guidance"])
    return temb

  def _context(self, cond: dict) -> tuple[jax.Array, jax.Array | None]:
    """Cross-attention tokens `[B, L, cross_attn_dim]` and mask: the text's, then
    the image embedding's `image_embed_tokens` (always attended to)."""
    tokens, masks = [], []
    if "tokens" in cond:
      tokens.append(cond["tokens"])
      masks.append(cond["mask"] if "mask" in cond else
                   jnp.ones(cond["tokens"].shape[:2], bool))
    if self.image_embed_dim and self.image_embed_tokens:
      emb = cond["image_embed"]
      k, d = self.image_embed_tokens, self.cross_attn_dim
      extra = nn.Dense(k * d, kernel_init=layers.default_init(), dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       name="image_embed_tokens")(emb.astype(self.dtype))
      tokens.append(extra.reshape(emb.shape[0], k, d).astype(jnp.float32))
      masks.append(jnp.ones((emb.shape[0], k), bool))
    if len(tokens) == 1 and "mask" not in cond and "tokens" in cond:
      return tokens[0], None  # as before the image embedding existed
    return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)

  def _block(self, h: jax.Array, temb: jax.Array, out_ch: int, train: bool, name: str,
             resample: str = "none") -> jax.Array:
    cls = _RematResBlock if self.remat else layers.ResBlock
    return cls(out_ch, self.dropout, resample, self.dtype, self.param_dtype,
               self.scale_shift_norm, name=name)(h, temb, train)

  def _attn(self, h: jax.Array, ctx, prefix: str, j: int, always: bool = False) -> jax.Array:
    """Self-attention (and cross-attention) if this feature-map size asks for it."""
    kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if always or h.shape[1] in self.attn_resolutions:
      cls = _RematSelfAttention if self.remat else layers.SelfAttention
      h = cls(**kw, name=f"{prefix}_attn_{j}")(h)
    if ctx is not None and h.shape[1] in self.cross_attn_resolutions:
      cls = _RematCrossAttention if self.remat else layers.CrossAttention
      h = cls(**kw, name=f"{prefix}_xattn_{j}")(h, *ctx)
    return h

  def _down(self, h, temb, ctx, train):
    skips = [h]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = self._block(h, temb, self.ch * mult, train, f"down_{i}_block_{j}")
        h = self._attn(h, ctx, f"down_{i}", j)
        skips.append(h)
      if i != len(self.ch_mult) - 1:
        if self.resblock_updown:
          h = self._block(h, temb, self.ch * mult, train, f"down_{i}_downsample", "down")
        else:
          h = layers.Downsample(self.conv_resample, self.dtype, self.param_dtype,
                                name=f"down_{i}_downsample")(h)
        skips.append(h)
    return h, skips

  def _mid(self, h, temb, ctx, train):
    h = self._block(h, temb, h.shape[-1], train, "mid_block_1")
    h = self._attn(h, ctx, "mid", 1, always=True)
    return self._block(h, temb, h.shape[-1], train, "mid_block_2")

  def _up(self, h, skips, temb, ctx, train):
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._block(h, temb, self.ch * self.ch_mult[i], train, f"up_{i}_block_{j}")
        h = self._attn(h, ctx, f"up_{i}", j)
      if i != 0:
        if self.resblock_updown:
          h = self._block(h, temb, h.shape[-1], train, f"up_{i}_upsample", "up")
        else:
          h = layers.Upsample(self.conv_resample, self.dtype, self.param_dtype,
                              name=f"up_{i}_upsample")(h)
    assert not skips
    return h

  # ---- Input checks (shapes are static, so these run once per trace) ----

  def _check_input(self, x: jax.Array, t: jax.Array, cond: dict) -> None:
    if x.ndim != 4:
      raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
    b, hgt, wid, _ = x.shape
    div = self.patch_size * 2 ** (len(self.ch_mult) - 1)
    if hgt % div or wid % div:
      raise ValueError(
          f"image size {hgt}x{wid} is not divisible by patch_size * 2**(len(ch_mult)-1) = "
          f"{self.patch_size} * {2 ** (len(self.ch_mult) - 1)} = {div}; resize the images or "
          "change patch_size / ch_mult")
    if t.shape != (b,):
      raise ValueError(f"t must have shape [B] = ({b},), got {t.shape}")
    sizes = [hgt // self.patch_size // 2**i for i in range(len(self.ch_mult))]
    for i, size in enumerate(sizes):
      if size in self.attn_resolutions or i == len(sizes) - 1:
        try:
          layers.resolve_heads(self.ch * self.ch_mult[i], self.num_heads, self.head_dim)
        except ValueError as e:
          raise ValueError(f"attention at size {size} (level {i}): {e}") from None
    if self.cross_attn_dim and not set(sizes) & set(self.cross_attn_resolutions):
      raise ValueError(
          f"cross_attn_resolutions={self.cross_attn_resolutions} match none of the U-Net's "
          f"feature-map sizes {sizes} for a {hgt}x{wid} input: the tokens would be unused")
    self._check_cond(cond, b)

  def _check_cond(self, cond: dict, b: int) -> None:
    built = {"label": self.num_classes, "vector": self.cond_vector_dim,
             "tokens": self.cross_attn_dim, "mask": self.cross_attn_dim,
             "low_res": self.low_res_channels, "aug_level": self.low_res_channels,
             "image_embed": self.image_embed_dim, "guidance": int(self.guidance_embed)}
    field = {"label": "num_classes", "vector": "cond_vector_dim", "tokens": "cross_attn_dim",
             "mask": "cross_attn_dim", "low_res": "low_res_channels",
             "aug_level": "low_res_channels", "image_embed": "image_embed_dim",
             "guidance": "guidance_embed"}
    for key in cond:
      if key not in built:
        raise ValueError(f"unknown cond key {key!r}; valid keys: {sorted(built)}")
      if not built[key]:
        raise ValueError(f"cond[{key!r}] given, but the model was built with "
                         f"{field[key]}=0; build it with {field[key]} > 0 or drop the key")
    shapes = {"label": (b,), "vector": (b, self.cond_vector_dim),
              "tokens": (b, None, self.cross_attn_dim), "mask": (b, None),
              "low_res": (b, None, None, self.low_res_channels), "aug_level": (b,),
              "image_embed": (b, self.image_embed_dim), "guidance": (b,)}
    # The image embedding's tokens are context enough: text tokens become optional.
    needed = dict(built, tokens=self.cross_attn_dim and not (
        self.image_embed_dim and self.image_embed_tokens))
    for key in ("label", "vector", "tokens", "low_res", "aug_level", "image_embed", "guidance"):
      if needed[key] and key not in cond:
        hint = (f"; pass jnp.full([B], {self.num_classes}) for the null class"
                if key == "label" else "")
        raise ValueError(f"the model was built with {field[key]}={built[key]} and needs "
                         f"cond[{key!r}] of shape {shapes[key]}{hint}")
    for key, value in cond.items():
      want = shapes[key]
      if value.ndim != len(want) or any(w is not None and w != s
                                        for w, s in zip(want, value.shape)):
        raise ValueError(f"cond[{key!r}] must have shape {want} (None = any), "
                         f"got {value.shape}")
    if "mask" in cond and cond["mask"].shape[1] != cond["tokens"].shape[1]:
      raise ValueError(f"cond['mask'] {cond['mask'].shape} does not match cond['tokens'] "
                       f"{cond['tokens'].shape}")
    if "guidance" in cond and not jnp.issubdtype(cond["guidance"].dtype, jnp.floating):
      raise ValueError(f"cond['guidance'] must be a float array, got {cond['guidance'].dtype}")
    if "label" in cond and not jnp.issubdtype(cond["label"].dtype, jnp.integer):
      raise ValueError(f"cond['label'] must be an int array, got {cond['label'].dtype}")
    if "mask" in cond and cond["mask"].dtype != jnp.bool_:
      raise ValueError(f"cond['mask'] must be bool (True = attend), got {cond['mask'].dtype}")
