"""Model registry: the one place a `config.model` ConfigDict becomes a Flax module."""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.clip.model import CLIP
from diffusion_jax.models.prior import PriorTransformer
from diffusion_jax.models.text_unet import TextTransformer, TextUNet
from diffusion_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "text_unet": UNet,
                                      "prior": PriorTransformer, "clip": CLIP}
# Models whose fields live in their own sub-section, config.model.<name>.
_OWN_SECTIONS = ("prior", "clip")
# `text_unet` is a UNet inside a TextUNet, with a TextTransformer built from these
# config fields (model.text_<field>); the UNet takes the transformer's width.
_TEXT_FIELDS = ("vocab_size", "max_length", "width", "num_layers", "num_heads")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Config fields that hold sequences: a command-line override may give a list.
_TUPLE_FIELDS = ("ch_mult", "attn_resolutions", "cross_attn_resolutions")


def _module_fields(cls: type[nn.Module]) -> set[str]:
  # Flax adds `parent` and `name` to every module; they are not config fields.
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _convert(key: str, value: Any) -> Any:
  """Turns one config value into the type the module field expects."""
  if key in ("dtype", "param_dtype"):
    if value not in _DTYPES:
      raise ValueError(f"model.{key}={value!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[value]
  if key in _TUPLE_FIELDS:
    if isinstance(value, (int, str)) or not hasattr(value, "__iter__"):
      raise ValueError(f"model.{key} must be a tuple of ints, got {value!r}")
    return tuple(value)
  return value


def _section_model(name: str, section: Mapping[str, Any] | None,
                   out_channels: int) -> nn.Module:
  """The prior (`model.prior`) or a CLIP (`model.clip`; image size, channels and
  the byte vocabulary come from the data: `clip_fields`)."""
  if section is None:
    raise ValueError(f"model.name={name!r} needs the section model.{name}")
  cfg = dict(section)
  cls = MODELS[name]
  unknown = sorted(set(cfg) - _module_fields(cls))
  if unknown:
    raise ValueError(f"model.{name} fields {unknown} are not fields of {cls.__name__}; "
                     f"valid fields: {sorted(_module_fields(cls))}")
  if name == "clip":
    cfg.setdefault("image_channels", out_channels)
  return cls(**{k: _convert(k, v) for k, v in cfg.items()})


def create_model(model_config: Mapping[str, Any], out_channels: int) -> nn.Module:
  """Builds the model named by `model_config.name`.

  Args:
    model_config: the `config.model` section (ConfigDict or any mapping): `name`
      plus fields of the module class; a field left out takes the class default.
    out_channels: output channels, normally `config.data.channels` (twice that
      if a caller learns variances).

  Returns:
    An unbound Flax module, called as `apply(variables, x, t, cond, train=...)`.

  Raises:
    ValueError: for an unknown name, a field the module does not have, or a value
      it rejects.
  """
  cfg = dict(model_config)
  name = cfg.pop("name", None)
  sections = {k: cfg.pop(k) for k in _OWN_SECTIONS if k in cfg}
  if name in _OWN_SECTIONS:  # a model of its own section; the U-Net's fields are unused
    return _section_model(name, sections.get(name), out_channels)
  text = {f: cfg.pop(f"text_{f}") for f in _TEXT_FIELDS if f"text_{f}" in cfg}
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; valid names: {sorted(MODELS)}")
  cls = MODELS[name]
  unknown = sorted(set(cfg) - _module_fields(cls))
  if unknown:
    raise ValueError(f"model fields {unknown} are not fields of {cls.__name__}; "
                     f"valid fields: {sorted(_module_fields(cls))}")
  if "out_channels" in cfg:
    raise ValueError("out_channels comes from the data (the create_model argument), "
                     "not from config.model")
  if not isinstance(out_channels, int) or out_channels < 1:
    raise ValueError(f"out_channels must be an int >= 1, got {out_channels!r}")
  kwargs = {k: _convert(k, v) for k, v in cfg.items()}
  if name != "text_unet":
    return cls(**kwargs, out_channels=out_channels)
  missing = [f"text_{f}" for f in _TEXT_FIELDS if f not in text]
  if missing:
    raise ValueError(f"model.name='text_unet' needs the fields {missing}")
  if kwargs.get("cross_attn_dim", 0) != text["width"] or kwargs.get(
      "cond_vector_dim", 0) != text["width"]:
    raise ValueError(f"model.name='text_unet': set model.cross_attn_dim and "
                     f"model.cond_vector_dim to model.text_width={text['width']} (the text "
                     "transformer's output width)")
  unet = cls(**kwargs, out_channels=out_channels)
  kw = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
  return TextUNet(unet=unet, text=TextTransformer(**text, **kw))


__all__ = ["CLIP", "MODELS", "PriorTransformer", "TextTransformer", "TextUNet", "UNet", "create_model"]
