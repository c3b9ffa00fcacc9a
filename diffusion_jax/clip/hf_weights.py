"""Hugging Face `CLIPModel` checkpoints <-> `CLIP` params, and CLIP's BPE tokenizer.

The Flax param paths of `model.CLIP` are HF's tensor names (`hf_name`), so loading
is a renaming plus the layout rules of `text.hf_weights` (a torch `Linear` weight
is the transpose of a Flax `Dense` kernel). The one extra rule is the patch
convolution: torch `[out, in, kh, kw]`, Flax `[kh, kw, in, out]`.

`load_hf_clip` reads `config.json` and `model.safetensors` (numpy, no torch) and
checks every tensor both ways: a missing, unused or misshapen tensor is a
`ValueError` naming it. `save_hf_clip` writes the same two files back (exactly).
`hf_clip_tokenizer` runs the folder's `tokenizer.json` (byte-level BPE that wraps a
caption in <|startoftext|> ... <|endoftext|> itself) with `text.WordPieceTokenizer`.
"""
import copy
import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.clip.model import ACTIVATIONS, CLIP
from diffusion_jax.text import hf_weights
from diffusion_jax.text.tokenizers import WordPieceTokenizer

PathLike = str | os.PathLike
# Buffers that older transformers saved; CLIP computes positions itself.
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_PATCH = "vision_model.embeddings.patch_embedding.weight"
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# HF's CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json
# leaves out (transformers fills them in the same way).
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)


def hf_name(path: tuple[str, ...]) -> str:
  """HF `CLIPModel` tensor name of a Flax param path.

  E.g. `("text_model", "layers_1", "self_attn", "q_proj", "kernel")` ->
  `"text_model.encoder.layers.1.self_attn.q_proj.weight"`.
  """
  *modules, leaf = path
  parts = []
  for m in modules:
    layer = re.fullmatch(r"layers_(\d+)", m)
    parts += ["encoder", "layers", layer.group(1)] if layer else [m]
  return ".".join([*parts, _LEAF_NAMES.get(leaf, leaf)])


def _swap_patch_axes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Swaps kh and kw of the patch conv (its own inverse).

  The shared helpers reverse all axes of a kernel, right for a Dense; torch's conv
  `[out, in, kh, kw]` reversed is `[kw, kh, in, out]`, so the spatial axes must be
  swapped once more to give Flax's `[kh, kw, in, out]`.
  """
  if _PATCH in state:
    state = {**state, _PATCH: np.ascontiguousarray(np.swapaxes(state[_PATCH], 2, 3))}
  return state


def abstract_params(module: CLIP) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened param shapes of `module` (`jax.eval_shape`: nothing is materialised)."""
  s = module.image_size
  pixels = jnp.zeros((1, s, s, module.image_channels), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels, ids, ids > -1)
  return traverse_util.flatten_dict(abstract["params"])


def init_shapes(module: CLIP) -> dict[str, tuple[int, ...]]:
  """HF name -> the shape `module` expects, in HF layout (torch `[out, in, ...]`)."""
  abstract = abstract_params(module)
  shapes = hf_weights.hf_shapes(abstract, hf_name)
  kh, kw, c, out = abstract[("vision_model", "embeddings", "patch_embedding", "kernel")].shape
  shapes[_PATCH] = (out, c, kh, kw)
  return shapes


def _shape_fields(name: str) -> str:
  """The config.json fields that set the shape of tensor `name` (for error hints)."""
  if name == "logit_scale":
    return "none: it is a scalar"
  tower = "text_config" if name.startswith("text_") else "vision_config"
  if name.endswith("projection.weight"):
    return f"projection_dim, {tower}.hidden_size"
  if "token_embedding" in name:
    return "text_config.vocab_size, text_config.hidden_size"
  if name.startswith("text_model.embeddings.position_embedding"):
    return "text_config.max_position_embeddings, text_config.hidden_size"
  if name.startswith("vision_model.embeddings.position_embedding"):
    return "vision_config.image_size, vision_config.patch_size, vision_config.hidden_size"
  if "patch_embedding" in name:
    return "vision_config.hidden_size, num_channels, patch_size"
  if ".mlp." in name:
    return f"{tower}.intermediate_size, {tower}.hidden_size"
  return f"{tower}.hidden_size"


def params_from_state_dict(module: CLIP, state: Mapping[str, np.ndarray],
                           source: str = "<state dict>") -> dict[str, Any]:
  """Maps HF-named arrays to `module`'s params, checking every name and shape.

  Raises:
    ValueError: a tensor is missing, unused (other than `IGNORED`) or of the wrong
      shape; the message names each one (and, for shapes, the config fields).
  """
  expected = init_shapes(module)
  missing = sorted(set(expected) - set(state))
  unused = sorted(set(state) - set(expected) - set(IGNORED))
  if missing or unused:
    raise ValueError(f"checkpoint {source} does not match the CLIP built from its config:"
                     f"\n  missing tensors ({len(missing)}): {missing[:12]}"
                     f"\n  unused tensors ({len(unused)}): {unused[:12]}")
  bad = [f"  {n}: expected {list(s)} (config {_shape_fields(n)}), found "
         f"{list(np.shape(state[n]))}" for n, s in sorted(expected.items())
         if tuple(np.shape(state[n])) != s]
  if bad:
    raise ValueError(f"checkpoint {source} has {len(bad)} tensor(s) whose shape does not "
                     "match its config:\n" + "\n".join(bad[:12]))
  found = _swap_patch_axes({n: np.asarray(state[n]) for n in expected})
  return hf_weights.params_from_hf(abstract_params(module), found, hf_name,
                                   module.param_dtype)


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> HF-named float32 numpy arrays (what `save_hf_clip` writes)."""
  return _swap_patch_axes(hf_weights.state_from_params(params, hf_name))


def _tower_config(hf: Mapping[str, Any], key: str, defaults: Mapping[str, Any]
                  ) -> dict[str, Any]:
  """`hf[key]` with HF's defaults; a `{key}_dict` (older transformers) overrides it."""
  return {**defaults, **(hf.get(key) or {}), **(hf.get(f"{key}_dict") or {})}


def _square(value: Any, field: str) -> int:
  """HF allows `image_size` / `patch_size` as a pair; CLIP here is square."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{field}={value!r}: only square sizes are supported")
    value = value[0]
  return int(value)


def clip_from_hf_config(hf: Mapping[str, Any], dtype: Any = jnp.float32) -> CLIP:
  """Builds the `CLIP` module that a HF `CLIPModel` config.json describes.

  Raises:
    ValueError: naming the field, for a model type other than "clip", a hidden_act
      other than "quick_gelu" / "gelu", or towers that differ in hidden_act or
      layer_norm_eps (this module has one of each).
  """
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(f"model_type={hf['model_type']!r}; load_hf_clip reads 'clip' only")
  text = _tower_config(hf, "text_config", TEXT_DEFAULTS)
  vision = _tower_config(hf, "vision_config", VISION_DEFAULTS)
  for key, tower in (("text_config", text), ("vision_config", vision)):
    if tower["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"{key}.hidden_act={tower['hidden_act']!r}; CLIP implements "
                       f"{sorted(ACTIVATIONS)}")
  for field in ("hidden_act", "layer_norm_eps"):
    if text[field] != vision[field]:
      raise ValueError(f"text_config.{field}={text[field]!r} differs from vision_config."
                       f"{field}={vision[field]!r}; CLIP uses one value for both towers")
  top = {**TOP_DEFAULTS, **hf}
  return CLIP(
      embed_dim=top["projection_dim"], image_size=_square(vision["image_size"], "image_size"),
      patch_size=_square(vision["patch_size"], "patch_size"),
      image_channels=vision["num_channels"], vision_width=vision["hidden_size"],
      vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
      vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
      text_width=text["hidden_size"], text_layers=text["num_hidden_layers"],
      text_heads=text["num_attention_heads"], vision_mlp_dim=vision["intermediate_size"],
      text_mlp_dim=text["intermediate_size"], act=text["hidden_act"],
      layer_norm_eps=float(text["layer_norm_eps"]),
      logit_scale_init=float(top["logit_scale_init_value"]), dtype=jnp.dtype(dtype))


def hf_config(module: CLIP, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The HF `CLIPModel` config.json of `module`.

  Args:
    module: the model.
    base: a config to keep other fields of (token ids, processor notes...), e.g. the
      one `load_hf_clip` returned; the architecture fields are `module`'s.
  """
  m = module
  hf = copy.deepcopy(dict(base or {}))
  for key in ("text_config_dict", "vision_config_dict"):
    hf.pop(key, None)  # they would override the fields written below
  shared = dict(hidden_act=m.act, layer_norm_eps=m.layer_norm_eps, projection_dim=m.embed_dim)
  hf["text_config"] = {**hf.get("text_config", {}), **shared,
                       "vocab_size": m.vocab_size, "hidden_size": m.text_width,
                       "intermediate_size": m.text_mlp_dim or 4 * m.text_width,
                       "num_hidden_layers": m.text_layers,
                       "num_attention_heads": m.text_heads,
                       "max_position_embeddings": m.context_length}
  hf["vision_config"] = {**hf.get("vision_config", {}), **shared,
                         "hidden_size": m.vision_width,
                         "intermediate_size": m.vision_mlp_dim or 4 * m.vision_width,
                         "num_hidden_layers": m.vision_layers,
                         "num_attention_heads": m.vision_heads,
                         "num_channels": m.image_channels, "image_size": m.image_size,
                         "patch_size": m.patch_size}
  hf.update(architectures=["CLIPModel"], model_type="clip", projection_dim=m.embed_dim,
            logit_scale_init_value=m.logit_scale_init)
  return hf


def load_hf_clip(path: PathLike, dtype: Any = "float32"
                 ) -> tuple[CLIP, dict[str, Any], dict[str, Any]]:
  """Loads a HF `CLIPModel` folder (`config.json`, `model.safetensors`).

  The text embedding is pooled at the last real token (`CLIP.encode_text`), which
  is HF's choice (first <|endoftext|>, or the highest id for configs with the old
  `eos_token_id` 2) for every caption that its tokenizer writes.

  Args:
    path: the folder.
    dtype: compute dtype of the module; params stay float32.

  Returns:
    `(module, params, config)`: `config` is the config.json dict (token ids etc.).

  Raises:
    ValueError: an unsupported config field (`clip_from_hf_config`), or a missing,
      unused or misshapen tensor (`params_from_state_dict`).
    FileNotFoundError: a file is missing.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(path)
  config = json.loads((folder / "config.json").read_text())
  module = clip_from_hf_config(config, dtype)
  weights = folder / "model.safetensors"
  params = params_from_state_dict(module, load_file(str(weights)), str(weights))
  return module, params, config


def save_hf_clip(module: CLIP, params: Mapping[str, Any], path: PathLike,
                 config: Mapping[str, Any] | None = None) -> None:
  """Writes `config.json` and `model.safetensors` that `load_hf_clip` (and
  transformers' `CLIPModel.from_pretrained`) read back; float32 weights.

  `config`: optional base config whose non-architecture fields are kept (`hf_config`).
  For a model trained here with `ByteTokenizer` set `text_config.eos_token_id` in it to
  a value that makes transformers pool at the last real token, as `CLIP` does.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config(module, config), indent=2) + "\n")
  # "format": "pt" is the metadata transformers expects of a safetensors checkpoint.
  save_file(to_state_dict(params), str(folder / "model.safetensors"),
            metadata={"format": "pt"})


class ClipBpeTokenizer(WordPieceTokenizer):
  """A CLIP `tokenizer.json` (byte-level BPE, `</w>` word ends) run by `tokenizers`.

  Encoding is `WordPieceTokenizer`'s: the file's post-processor wraps each caption
  in <|startoftext|> ... <|endoftext|>, truncation keeps the <|endoftext|>.
  """

  def decode(self, ids: np.ndarray) -> list[str]:
    """`[B, L]` ids -> `B` strings. The file's ByteLevel decoder keeps the `</w>`
    word ends; they become spaces, as in transformers' CLIPTokenizer."""
    return [" ".join(t.replace("</w>", " ").split()) for t in super().decode(ids)]


def hf_clip_tokenizer(path: PathLike) -> ClipBpeTokenizer:
  """The tokenizer of a HF CLIP folder: `tokenizer.json`, padded with the pad token of
  `tokenizer_config.json` / `special_tokens_map.json` (<|endoftext|> if neither says)."""
  folder = pathlib.Path(path)
  pad = "<|endoftext|>"
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    if (folder / name).is_file():
      value = json.loads((folder / name).read_text()).get("pad_token") or pad
      pad = value["content"] if isinstance(value, dict) else value  # AddedToken form
  return ClipBpeTokenizer(folder / "tokenizer.json", pad_token=pad)
