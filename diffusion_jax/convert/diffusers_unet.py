"""diffusers' `UNet2DModel` <-> this project's `UNet`: config fields and weights.

The DDPM checkpoints published in the diffusers layout (CIFAR-10 32x32, CelebA-HQ,
LSUN church and bedroom 256x256) are `UNet2DModel`s whose layers are, one for one,
those of `models/unet.py` (which follows DDPM's own TensorFlow code). This module
is pure numpy: it maps a `config.json` to `config.model` fields and a state dict
(PyTorch names and layouts) to Flax parameters, and back. Every tensor is
accounted for both ways: a key left over, a parameter left unfilled or a shape
that differs is an error naming it, never a silent partial load.

What maps (anything else is an error naming the field and its value):
  block_out_channels = ch * ch_mult (multiples of the first entry)
  layers_per_block   = num_res_blocks
  AttnDownBlock2D at level i (mirrored by AttnUpBlock2D) = attention at
                       feature-map size sample_size / 2**i (attn_resolutions)
  attention_head_dim = head_dim (None: one head per block, DDPM)
  dropout            = dropout
and the fixed DDPM choices: positional sinusoidal time embedding with
flip_sin_to_cos=False and freq_shift=1, GroupNorm(32) with eps 1e-6 everywhere,
stride-2 conv downsampling with padding (0, 1, 0, 1) (downsample_padding=0, TF's
SAME), nearest + conv upsampling, SiLU, no class embedding, out = in channels, and resnet_time_scale_shift
"default" (with "scale_shift", diffusers' middle attention block has no GroupNorm,
which this U-Net always has, so such models are refused).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert.accounting import ConversionError, check_accounted, flatten, unflatten

# UNet2DModel's constructor defaults (diffusers 0.42): a key missing from an
# older config.json takes these, exactly as `from_pretrained` would.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)

# Fields that must hold exactly these values (the DDPM architecture this U-Net is).
_FIXED: dict[str, tuple[Any, str]] = {
    "center_input_sample": (False, "the input is used as is"),
    "time_embedding_type": ("positional", "a sinusoidal timestep embedding"),
    "flip_sin_to_cos": (False, "sin first, then cos (DDPM's get_timestep_embedding)"),
    "freq_shift": (1, "frequencies exp(-log(10000) i / (half - 1))"),
    "mid_block_type": ("UNetMidBlock2D", "a ResBlock, attention, ResBlock middle"),
    "mid_block_scale_factor": (1, "no output rescaling"),
    "downsample_padding": (0, "stride-2 convs padded (0, 1, 0, 1), TF's SAME"),
    "downsample_type": ("conv", "stride-2 conv downsampling"),
    "upsample_type": ("conv", "nearest-neighbour upsampling then a 3x3 conv"),
    "act_fn": ("silu", "SiLU (swish) activations"),
    "norm_num_groups": (32, "GroupNorm(32)"),
    "norm_eps": (1e-6, "GroupNorm epsilon 1e-6"),
    "add_attention": (True, "attention in the middle block"),
    "class_embed_type": (None, "no class embedding (class models are not exported)"),
    "num_class_embeds": (None, "no class embedding"),
    "resnet_time_scale_shift": ("default", "the embedding added before norm2 (with "
                                "'scale_shift' the middle attention loses its GroupNorm)"),
}
_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")


def _norm(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def model_fields(cfg: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
  """`config.model` fields (and image size/channels) from a UNet2DModel config.

  Args:
    cfg: the parsed `config.json` of a diffusers `UNet2DModel`.
    source: how to name the file in errors.

  Returns:
    dict with `model` (fields of `UNet`, plus `name="unet"`), `image_size` and
    `channels`.

  Raises:
    ConversionError: naming each field whose value this U-Net does not have.
  """
  if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ConversionError(f"{source}: _class_name is {cfg['_class_name']!r}; only a "
                          "diffusers UNet2DModel (the DDPM checkpoints' class) converts.")
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ConversionError(f"{source}: unknown UNet2DModel fields {unknown} (a newer diffusers "
                          "option?): they could change the architecture, so nothing was "
                          "converted.")
  c = {k: _norm(cfg.get(k, v)) for k, v in DIFFUSERS_DEFAULTS.items()}
  bad = [f"{k}={c[k]!r} (this U-Net has {v!r}: {why})" for k, (v, why) in _FIXED.items()
         if c[k] != v]
  chans = list(c["block_out_channels"])
  ch = chans[0]
  if any(x % ch for x in chans):
    bad.append(f"block_out_channels={chans} (each must be a multiple of the first, ch)")
  if c["time_embedding_dim"] not in (None, 4 * ch):
    bad.append(f"time_embedding_dim={c['time_embedding_dim']} (this U-Net has 4 * "
               f"block_out_channels[0] = {4 * ch})")
  if c["attn_norm_num_groups"] not in (None, 32):
    bad.append(f"attn_norm_num_groups={c['attn_norm_num_groups']} (GroupNorm(32))")
  if c["in_channels"] != c["out_channels"]:
    bad.append(f"out_channels={c['out_channels']} with in_channels={c['in_channels']} "
               "(the output is eps, x0 or v of the input's channels; learned variances "
               "are not supported)")
  levels = len(chans)
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  if len(down) != levels or len(up) != levels or any(t not in _DOWN for t in down) or any(
      t not in _UP for t in up):
    bad.append(f"down_block_types={down}, up_block_types={up} (one of {_DOWN} / {_UP} per "
               f"entry of block_out_channels, {levels} each)")
  else:
    attn_down = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    attn_up = sorted(levels - 1 - i for i, t in enumerate(up) if t == "AttnUpBlock2D")
    if attn_down != attn_up:
      bad.append(f"attention at down levels {attn_down} but up levels {attn_up} (this U-Net "
                 "attends at the same feature-map sizes on both paths)")
  size = c["sample_size"]
  if isinstance(size, tuple) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  if not isinstance(size, int) or size % 2 ** (levels - 1):
    bad.append(f"sample_size={c['sample_size']!r} (a square size divisible by "
               f"2**{levels - 1}; it places the attention blocks)")
  if bad:
    raise ConversionError(f"{source} describes a UNet2DModel this project's U-Net cannot "
                          "represent exactly:\n  " + "\n  ".join(bad))
  head_dim = c["attention_head_dim"] or 0
  model = dict(name="unet", ch=ch, ch_mult=tuple(x // ch for x in chans),
               num_res_blocks=c["layers_per_block"],
               attn_resolutions=tuple(size // 2 ** i for i in attn_down),
               dropout=float(c["dropout"]), num_heads=1, head_dim=head_dim,
               resblock_updown=False, conv_resample=True, patch_size=1,
               scale_shift_norm=False)
  return dict(model=model, image_size=size, channels=c["in_channels"])


def diffusers_config(model: Mapping[str, Any], image_size: int, channels: int) -> dict:
  """The UNet2DModel `config.json` of a project U-Net (the inverse of model_fields).

  Raises:
    ConversionError: for a model with no UNet2DModel equivalent (conditioning,
      a patch stem, BigGAN-style resampling, attention at a size that is no level).
  """
  m = dict(model)
  bad = []
  if m.get("name", "unet") != "unet":
    bad.append(f"model.name={m.get('name')!r} (only 'unet')")
  for field in ("num_classes", "cond_vector_dim", "cross_attn_dim", "low_res_channels",
                "image_embed_dim"):
    if m.get(field, 0):
      bad.append(f"model.{field}={m[field]} (conditioning has no UNet2DModel equivalent)")
  if m.get("patch_size", 1) != 1:
    bad.append(f"model.patch_size={m['patch_size']} (no space-to-depth stem in UNet2DModel)")
  if m.get("scale_shift_norm", False):
    bad.append("model.scale_shift_norm=True (diffusers' 'scale_shift' drops the middle "
               "attention's GroupNorm, which this U-Net keeps)")
  if m.get("resblock_updown", False) or not m.get("conv_resample", True):
    bad.append("model.resblock_updown / conv_resample (only conv resampling converts)")
  ch, mult = m["ch"], tuple(m["ch_mult"])
  sizes = [image_size // 2 ** i for i in range(len(mult))]
  attn = tuple(m.get("attn_resolutions", ()))
  if any(r not in sizes for r in attn):
    bad.append(f"model.attn_resolutions={attn}: sizes {[r for r in attn if r not in sizes]} "
               f"are no level of a {image_size}x{image_size} U-Net (levels {sizes}); "
               "drop them first")
  heads, head_dim = m.get("num_heads", 1), m.get("head_dim", 0)
  if not head_dim and heads != 1:
    bad.append(f"model.num_heads={heads} with head_dim=0 (UNet2DModel sets heads through "
               "attention_head_dim; use head_dim)")
  if bad:
    raise ConversionError("This model has no diffusers UNet2DModel equivalent:\n  "
                          + "\n  ".join(bad))
  levels = [i for i, s in enumerate(sizes) if s in attn]
  return dict(
      _class_name="UNet2DModel", sample_size=image_size, in_channels=channels,
      out_channels=channels, center_input_sample=False, time_embedding_type="positional",
      time_embedding_dim=None, freq_shift=1, flip_sin_to_cos=False,
      down_block_types=[_DOWN[i in levels] for i in range(len(mult))],
      mid_block_type="UNetMidBlock2D",
      up_block_types=[_UP[(len(mult) - 1 - i) in levels] for i in range(len(mult))],
      block_out_channels=[ch * k for k in mult], layers_per_block=m["num_res_blocks"],
      mid_block_scale_factor=1, downsample_padding=0, downsample_type="conv",
      upsample_type="conv", dropout=float(m.get("dropout", 0.0)), act_fn="silu",
      attention_head_dim=head_dim or None, norm_num_groups=32, attn_norm_num_groups=None,
      norm_eps=1e-6,
      resnet_time_scale_shift="default",
      add_attention=True, class_embed_type=None, num_class_embeds=None,
      num_train_timesteps=None)


# ---------------------------------------------------------------------------
# Parameter names: Flax path <-> PyTorch key.

_SUB = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
        "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Keys of checkpoints saved before diffusers renamed its attention (the published
# DDPM ones): the same tensors under older names.
_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
           ".to_out.0.": ".proj_attn."}


def _module_key(name: str, levels: int) -> str:
  """Top-level Flax module name -> the PyTorch module path."""
  fixed = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
           "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0",
           "mid_block_2": "mid_block.resnets.1"}
  if name in fixed:
    return fixed[name]
  m = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", name)
  if not m:
    raise ConversionError(f"parameter group {name!r} has no UNet2DModel counterpart")
  path, i, kind, j = m.groups()
  i = int(i) if path == "down" else levels - 1 - int(i)  # diffusers counts up from the bottom
  where = {"block": f"resnets.{j}", "attn": f"attentions.{j}",
           "downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv"}[kind]
  return f"{path}_blocks.{i}.{where}"


def torch_key(path: tuple[str, ...], levels: int) -> str:
  """('down_1_attn_0', 'q', 'kernel') -> 'down_blocks.1.attentions.0.to_q.weight'."""
  if path[0] == "temb":
    return f"time_embedding.linear_{int(path[1][-1]) + 1}.{_LEAF[path[-1]]}"
  parts = [_module_key(path[0], levels)]
  parts += [_SUB.get(p, p) for p in path[1:-1] if not (path[0].endswith("sample") and p == "conv")]
  return ".".join(parts + [_LEAF[path[-1]]])


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of the Flax parameter `path` of shape `shape`."""
  return _to_torch(path, np.empty(shape, np.float32)).shape if shape else ()


def _to_flax(path: tuple[str, ...], w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if path[-1] == "kernel" and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path[-1] == "kernel" and len(shape) == 3 and path[-2] == "proj_out":
    return w.T.reshape(shape)  # [C, H*D] -> [H, D, C]
  if path[-1] == "kernel":
    return w.T.reshape(shape)  # [out, in] -> [in, out] or [C, H, D]
  return w.reshape(shape)  # biases ([H*D] -> [H, D]) and norm scales


def _to_torch(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and w.ndim == 4:
    return w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if path[-1] == "kernel" and path[-2] == "proj_out" and w.ndim == 3:
    return w.reshape(-1, w.shape[-1]).T  # [H, D, C] -> [C, H*D]
  if path[-1] == "kernel":
    return w.reshape(w.shape[0], -1).T  # [in, out] or [C, H, D] -> [out, in]
  return w.reshape(-1)


def state_dict_to_params(state: Mapping[str, np.ndarray], shapes: Mapping[str, Any],
                         levels: int, source: str = "the checkpoint") -> dict:
  """A UNet2DModel state dict -> the U-Net's Flax params (float32).

  Args:
    state: PyTorch key -> array (OIHW convs, [out, in] linears); the legacy
      attention names (query, key, value, proj_attn) are accepted too.
    shapes: the U-Net's params tree (arrays or ShapeDtypeStructs), naming every
      parameter to fill and its shape.
    levels: len(ch_mult).
    source: how to name the checkpoint in errors.

  Raises:
    ConversionError: listing every missing, unused or mis-shaped tensor.
  """
  left = dict(state)
  flat, missing, wrong = {}, [], []
  for path, leaf in flatten(shapes).items():
    key = torch_key(path, levels)
    legacy = next((key.replace(new, old) for new, old in _LEGACY.items() if new in key), None)
    if key not in left and legacy in left:
      key = legacy
    if key not in left:
      missing.append(key)
      continue
    w = np.asarray(left.pop(key), np.float32)
    shape = tuple(leaf.shape)
    if w.shape != torch_shape(path, shape):
      wrong.append(f"{key}: {list(w.shape)}, the U-Net needs {list(torch_shape(path, shape))}")
      continue
    flat[path] = _to_flax(path, w, shape)
  check_accounted(f"{source} does not match the U-Net its config.json describes:",
                  missing, sorted(left), wrong)
  return unflatten(flat)


def params_to_state_dict(params: Mapping[str, Any], levels: int) -> dict[str, np.ndarray]:
  """The U-Net's Flax params -> a UNet2DModel state dict (current key names)."""
  return {torch_key(path, levels): np.ascontiguousarray(_to_torch(path, np.asarray(w, np.float32)))
          for path, w in flatten(params).items()}
