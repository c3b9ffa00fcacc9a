"""The DDPM paper's own TensorFlow checkpoints (`diffusion_tf`, `model.ckpt-N`) as workdirs.

    python -m diffusion_jax.convert import-tf --src=DIR/model.ckpt-790000 \
        --workdir=W --config=configs/cifar10.py

The official code (`diffusion_tf/models/unet.py`) names its variables
`model/<scope>/<layer>/{W,b}` and its GroupNorms `.../{gamma,beta}`, with scopes
`down_<i>/block_<j>`, `down_<i>/attn_<j>`, `down_<i>/downsample/conv`, `mid/block_1`,
`mid/attn_1`, `mid/block_2`, `up_<i>/...`, `temb/dense0`, `conv_in`, `norm_out`,
`conv_out`: `models/unet.py` follows the same names with `/` -> `_` between scope
and layer, and the same layouts (HWIO convs, [in, out] dense and 1x1 "nin"
kernels, which are reshaped to this U-Net's 1x1 convs and attention projections).
`tf.train.ExponentialMovingAverage` keeps the EMA copy of each variable as
`<name>/ExponentialMovingAverage`; the paper's samples use those (the default).

The checkpoint says nothing about the schedule or the architecture's
hyperparameters, so `--config` gives them (configs/cifar10.py,
configs/celebahq256.py, configs/lsun_church256.py are the paper's); every
variable is checked against the U-Net that config builds, both ways.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import ml_collections
import numpy as np

from diffusion_jax.convert import workdir_io
from diffusion_jax.convert.accounting import (ConversionError, check_accounted, flatten,
                                              unflatten)

EMA_SUFFIX = "/ExponentialMovingAverage"
_LEAF = {"kernel": "W", "bias": "b"}
_NORM_LEAF = {"scale": "gamma", "bias": "beta"}


def tf_name(path: tuple[str, ...], scope: str = "model") -> str:
  """('down_1_attn_0', 'q', 'kernel') -> 'model/down_1/attn_0/q/W'."""
  head = path[0]
  m = re.fullmatch(r"(down|up)_(\d+)_(.+)", head) or re.fullmatch(r"(mid)_(.+)", head)
  if m and m.group(1) == "mid":
    head = f"mid/{m.group(2)}"
  elif m:
    head = f"{m.group(1)}_{m.group(2)}/{m.group(3)}"
  norm = any(p.startswith("norm") for p in path[-2:]) or head == "norm_out"
  leaf = (_NORM_LEAF if norm else _LEAF)[path[-1]]
  return "/".join((scope, head) + tuple(path[1:-1]) + (leaf,))


def variables_to_params(reader_get, names: Mapping[str, tuple], shapes: Mapping[str, Any],
                        ema: bool, source: str) -> dict:
  """TF checkpoint variables -> the U-Net's Flax params.

  Args:
    reader_get: name -> numpy array (a checkpoint reader's get_tensor).
    names: every variable name in the checkpoint -> its shape.
    shapes: the U-Net's params tree (arrays or ShapeDtypeStructs).
    ema: read the `/ExponentialMovingAverage` copies.
    source: how to name the checkpoint in errors.

  Raises:
    ConversionError: listing the missing, unused and mis-shaped variables.
  """
  # Model weights proper: under model/, not an EMA copy or an optimiser slot.
  weights = {n for n in names if n.startswith("model/") and n.split("/")[-1] in
             ("W", "b", "gamma", "beta")}
  flat, missing, wrong, used = {}, [], [], set()
  for path, leaf in flatten(shapes).items():
    base = tf_name(path)
    name = base + EMA_SUFFIX if ema else base
    if name not in names:
      missing.append(name)
      continue
    used.add(base)
    value = np.asarray(reader_get(name), np.float32)
    shape = tuple(leaf.shape)
    squeeze = lambda s: tuple(d for d in s if d != 1)
    if value.shape != shape and squeeze(value.shape) != squeeze(shape):
      wrong.append(f"{name}: {list(value.shape)} for {'/'.join(path)} {list(shape)}")
      continue
    flat[path] = value.reshape(shape)  # nin [in, out] -> [1, 1, in, out] / [C, 1, C]
  unused = sorted(weights - used)
  hint = ("  The checkpoint has no EMA copies: pass --notf_ema for the raw weights."
          if ema and missing and not any(n.endswith(EMA_SUFFIX) for n in names) else "")
  check_accounted(f"{source} does not match the U-Net of the given --config:", missing,
                  unused, wrong, hint)
  return unflatten(flat)


def import_tf(src: str, workdir: str, config: ml_collections.ConfigDict, *, ema: bool = True,
              step: int = 0) -> ml_collections.ConfigDict:
  """Converts a `diffusion_tf` checkpoint (prefix `model.ckpt-N`) into a new workdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only this importer)
  from diffusion_jax.convert import diffusers as diffusers_io  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.name != "unet" or m.patch_size != 1 or m.num_heads != 1 or m.head_dim or any(
      m[f] for f in ("num_classes", "cond_vector_dim", "cross_attn_dim", "low_res_channels",
                     "image_embed_dim")) or m.scale_shift_norm or m.resblock_updown:
    raise ConversionError("import-tf needs a --config with DDPM's plain U-Net (model.name="
                          "'unet', patch_size 1, one attention head, no conditioning), e.g. "
                          "configs/cifar10.py or configs/celebahq256.py.")
  try:
    reader = tf.train.load_checkpoint(src)
  except Exception as e:  # pylint: disable=broad-except  (TF raises several types)
    raise ConversionError(f"cannot read the TensorFlow checkpoint {src!r} ({type(e).__name__}: "
                          f"{str(e)[:300]}); pass the prefix, e.g. DIR/model.ckpt-790000, with "
                          "its .index and .data-* files beside it.") from None
  names = reader.get_variable_to_shape_map()
  shapes = diffusers_io.param_shapes(config)
  params = variables_to_params(reader.get_tensor, {k: tuple(v) for k, v in names.items()},
                               shapes, ema, src)
  global_step = int(reader.get_tensor("global_step")) if "global_step" in names else None
  workdir_io.write_workdir(config, params, workdir, step=step, provenance=dict(
      format="diffusion_tf checkpoint", src=os.path.abspath(src), ema=ema,
      global_step=global_step, num_variables=len(names)))
  return config
