"""A frozen T5 encoder (Imagen's text encoder) in Flax, loadable from a HF checkpoint.

`T5Encoder` is HF `T5EncoderModel` (T5, T5 v1.1, Flan-T5, mT5) without dropout:
shared embedding; pre-norm self-attention and feed-forward blocks with T5's RMS
norm (scale only); a final norm. Attention is unscaled (T5 folds 1/sqrt(d) into
the init) plus a relative position bias from block 0's table, shared by all
blocks. Outputs: token states `[B, L, D]` and their masked mean `[B, D]`.
`load_pretrained(dir)` reads config.json, the encoder tensors of the safetensors
(decoder skipped) and tokenizer.json, checking every tensor name and shape.
"""
import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.text import hf_weights
from diffusion_jax.text.bert import mean_pool
from diffusion_jax.text.tokenizers import WordPieceTokenizer

Dtype = Any
PathLike = str | os.PathLike
# feed_forward_proj -> (gated, activation). HF maps "gated-gelu" to "gelu_new", the
# tanh approximation (T5 v1.1, Flan-T5, mT5); "relu" is the original T5's.
FEED_FORWARD: dict[str, tuple[bool, Callable[[jax.Array], jax.Array]]] = {
    "relu": (False, jax.nn.relu),
    "gated-gelu": (True, functools.partial(jax.nn.gelu, approximate=True)),
}
MODEL_TYPES = ("t5", "mt5")  # HF's MT5 classes are copies of T5's: same model.
UNSUPPORTED_MODEL_TYPES = {
    "umt5": "UMT5 has a relative attention bias table in every layer, not only the first",
    "longt5": "LongT5 uses local / transient-global attention",
}
# Tensors of a T5 checkpoint that the encoder does not use.
DEFAULT_IGNORE = ("decoder.", "lm_head.")
_EMBED_ALIAS = "encoder.embed_tokens.weight"  # the same tensor as shared.weight
# Flax module in a block -> HF name inside `encoder.block.{i}.`.
_BLOCK_NAMES = {"attention_norm": "layer.0.layer_norm", "ffn_norm": "layer.1.layer_norm",
                **{n: f"layer.0.SelfAttention.{n}" for n in "qkvo"},
                **{n: f"layer.1.DenseReluDense.{n}" for n in ("wi", "wi_0", "wi_1", "wo")}}
# HF name part -> the T5Config fields that set the tensor's shape (for error hints).
_SHAPE_FIELDS = (("shared", "vocab_size, d_model"),
                 ("relative_attention_bias", "relative_attention_num_buckets, num_heads"),
                 ("SelfAttention", "num_heads * d_kv, d_model"),
                 ("DenseReluDense", "d_ff, d_model"))
_BIAS_NAME = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder; the defaults are HF `T5Config`'s (t5-small)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}; T5Encoder implements "
                       f"{sorted(FEED_FORWARD)} (T5: 'relu'; T5 v1.1 / Flan-T5: 'gated-gelu')")
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
      raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets}"
                       "; it must be even and >= 4")

  @property
  def hidden_size(self) -> int:
    """`D`, the width of the outputs (as `BertConfig.hidden_size`)."""
    return self.d_model

  @classmethod
  def from_hf_json(cls, path: PathLike) -> "T5Config":
    """Reads a HF `config.json` of a T5 / mT5 model; absent fields take HF's defaults.

    Raises:
      ValueError: another model type, or a variant `T5Encoder` does not implement.
    """
    with open(path) as f:
      hf = json.load(f)
    _check_model_type(hf.get("model_type"), path)
    fields = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
    try:
      return cls(**fields)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


def _check_model_type(model_type: str | None, source: Any) -> None:
  """Raises a ValueError unless `T5Encoder` implements `model_type`."""
  why = UNSUPPORTED_MODEL_TYPES.get(model_type)
  if why or model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported: "
                     f"{why or 'not a T5 model'}; T5Encoder implements {MODEL_TYPES}")


def is_t5_checkpoint(path: PathLike) -> bool:
  """Whether `path/config.json` names a T5 model (False without a config.json).

  Raises:
    ValueError: a T5 variant that `T5Encoder` does not implement (UMT5, LongT5).
  """
  config = pathlib.Path(path) / "config.json"
  if not config.is_file():
    return False
  with open(config) as f:
    model_type = json.load(f).get("model_type")
  if model_type in UNSUPPORTED_MODEL_TYPES:
    _check_model_type(model_type, config)
  return model_type in MODEL_TYPES


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """HF `T5Attention._relative_position_bucket` with `bidirectional=True` (the encoder).

  Half the buckets are for keys after the query; in each half, distances below
  `num_buckets / 4` get a bucket each, larger ones log-spaced buckets up to
  `max_distance`. float32 log, truncated as in HF: the bucket edges agree exactly.

  Args:
    relative_position: int array of `key_position - query_position`, any shape.
    num_buckets, max_distance: `relative_attention_num_buckets` / `_max_distance`.

  Returns:
    int32 buckets in `[0, num_buckets)`, the shape of `relative_position`.
  """
  relative_position = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  offset = np.where(relative_position > 0, half, 0)
  distance = np.abs(relative_position)
  max_exact = half // 2
  # max(distance, 1): log(0) is never selected below, but would warn.
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
  scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (offset + np.where(distance < max_exact, distance, large)).astype(np.int32)


def rms_norm(config: T5Config, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.RMSNorm:
  """HF `T5LayerNorm`: `x / sqrt(mean(x^2) + eps) * weight`, statistics in float32."""
  return nn.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                    name=name)


class T5Block(nn.Module):
  """HF `T5Block` of the encoder: `x += Attention(norm(x)); x += FeedForward(norm(x))`.

  Attention (HF `T5Attention`) has no bias terms and no 1/sqrt(d_kv) scaling. The
  feed-forward is `wo(relu(wi(x)))` ("relu") or `wo(gelu_tanh(wi_0(x)) * wi_1(x))`.
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, L, D]`, bias `[1, H, L, L]` float32, mask `[B, L]` bool -> `[B, L, D]`."""
    cfg = self.config
    b, length, d = x.shape
    inner = cfg.num_heads * cfg.d_kv
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    h = rms_norm(cfg, "attention_norm", self.dtype, self.param_dtype)(x)
    q, k, v = (dense(inner, n)(h).reshape(b, length, cfg.num_heads, cfg.d_kv) for n in "qkv")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + position_bias
    # Padded keys get zero weight; padded queries compute values nobody reads.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    x = x + dense(d, "o")(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, inner))
    h = rms_norm(cfg, "ffn_norm", self.dtype, self.param_dtype)(x)
    gated, act = FEED_FORWARD[cfg.feed_forward_proj]
    if gated:
      h = act(dense(cfg.d_ff, "wi_0")(h)) * dense(cfg.d_ff, "wi_1")(h)
    else:
      h = act(dense(cfg.d_ff, "wi")(h))
    return x + dense(d, "wo")(h)


class T5Encoder(nn.Module):
  """T5 encoder (HF `T5EncoderModel`, no dropout) plus masked mean pooling.

  Attributes:
    config: architecture; `T5Config.from_hf_json` reads a checkpoint's.
    normalize: L2-normalise the pooled vector (off: Imagen uses T5's raw states).
    dtype: compute dtype (softmax and norm statistics stay float32).
    param_dtype: dtype of the parameters.
  """
  config: T5Config = T5Config()
  normalize: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      ids: `[B, L]` int32 token ids (`<pad>` = 0 at padding, by convention).
      mask: `[B, L]` bool, True for real tokens. Padding is never attended to, so
        its ids do not change the real tokens' outputs.

    Returns:
      `(tokens, pooled)`: `[B, L, D]` final states (padded positions hold values
      that carry no meaning, as in HF) and the `[B, D]` float32 mean of the real ones.
    """
    cfg = self.config
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
    mask = mask.astype(bool)
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="shared")(ids)
    # One bias for all blocks (HF computes it in block 0 and passes it on); the
    # buckets depend only on the static L, so they are a numpy constant.
    positions = np.arange(ids.shape[1])
    buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name="relative_attention_bias")
    position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
    for i in range(cfg.num_layers):
      x = T5Block(cfg, self.dtype, self.param_dtype, name=f"block_{i}")(x, position_bias, mask)
    x = rms_norm(cfg, "final_layer_norm", self.dtype, self.param_dtype)(x)
    return x, mean_pool(x, mask, self.normalize)


# ---------------------------------------------------------------------------
# Loading a HF checkpoint.


def hf_name(path: tuple[str, ...]) -> str:
  """HF tensor name of a Flax param path.

  E.g. `("block_1", "wi_0", "kernel")` -> `"encoder.block.1.layer.1.DenseReluDense.wi_0.weight"`.
  """
  top = {"shared": "shared.weight", "relative_attention_bias": _BIAS_NAME,
         "final_layer_norm": "encoder.final_layer_norm.weight"}
  if path[0] in top:
    return top[path[0]]
  return f"encoder.block.{path[0][len('block_'):]}.{_BLOCK_NAMES[path[1]]}.weight"


def init_shapes(module: T5Encoder) -> dict[str, tuple[int, ...]]:
  """HF name -> the shape the module expects, in HF layout (Linear weights `[out, in]`)."""
  return hf_weights.hf_shapes(hf_weights.abstract_params(module), hf_name)


def _check_state(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any],
                 ignore: tuple[str, ...], config: T5Config, source: str) -> None:
  """Raises a ValueError naming each missing, unused or wrongly shaped tensor, and fixes."""
  missing = sorted(set(expected) - set(found))
  unused = sorted(n for n in set(found) - set(expected) if not n.startswith(ignore))
  fields = lambda n: next((f for key, f in _SHAPE_FIELDS if key in n), "d_model")
  bad = [f"\n    {n}: expected {list(shape)} (T5Config {fields(n)}), "
         f"found {list(found[n].shape)}"
         for n, shape in sorted(expected.items()) if n in found and found[n].shape != shape]
  if missing or unused or bad:
    raise ValueError(
        f"checkpoint {source} does not match the T5Encoder built from {config}:"
        f"\n  missing tensors ({len(missing)}): {missing[:12]}"
        f"\n  unused tensors ({len(unused)}): {unused[:12]}"
        f"\n  tensors of another shape ({len(bad)}):" + "".join(bad[:12]) +
        "\nFix: build the module from the config.json shipped with these weights "
        "(load_pretrained(dir) does), or set the named T5Config fields to the checkpoint's."
        " Extra encoder.block.N.* tensors mean more layers (num_layers); "
        "DenseReluDense.wi vs wi_0/wi_1 means feed_forward_proj 'relu' vs 'gated-gelu'; a "
        "relative_attention_bias past block 0 is UMT5 (not supported); pass `ignore=` "
        f"name prefixes for other tensors to skip (now {ignore}).")


def params_from_state_dict(module: T5Encoder, state: Mapping[str, np.ndarray],
                           ignore: tuple[str, ...] = DEFAULT_IGNORE,
                           source: str = "<state dict>") -> dict[str, Any]:
  """Maps HF-named T5 arrays to the module's Flax params, checking names and shapes.

  Args:
    module: the encoder whose params to build.
    state: HF name -> array of a `T5EncoderModel` or `T5ForConditionalGeneration`;
      the embedding is `shared.weight` and/or `encoder.embed_tokens.weight`.
    ignore: name prefixes that may be present unused (the decoder and LM head).
    source: where `state` came from, for error messages.

  Returns:
    The `params` collection (a nested dict of `param_dtype` arrays).

  Raises:
    ValueError: naming each missing, unused (not ignored) or wrongly shaped tensor.
  """
  found = dict(state)
  alias = found.pop(_EMBED_ALIAS, None)
  if alias is not None and "shared.weight" not in found:
    found["shared.weight"] = alias
  abstract = hf_weights.abstract_params(module)
  _check_state(hf_weights.hf_shapes(abstract, hf_name), found, ignore, module.config, source)
  return hf_weights.params_from_hf(abstract, found, hf_name, module.param_dtype)


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse map: Flax params -> HF-named float32 numpy arrays."""
  return hf_weights.state_from_params(params, hf_name)


def read_encoder_tensors(model_dir: PathLike, ignore: tuple[str, ...] = DEFAULT_IGNORE
                         ) -> dict[str, np.ndarray]:
  """The tensors of `model.safetensors` (or its shards) whose names `ignore` does not skip.

  Ignored tensors (the decoder: half of a `T5ForConditionalGeneration`) are never
  read. float16 / bfloat16 tensors keep their dtype (numpy via `ml_dtypes`).

  Raises:
    FileNotFoundError: neither `model.safetensors` nor its index is present.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    with open(index) as f:
      where = json.load(f)["weight_map"]  # tensor name -> shard file
  elif (model_dir / "model.safetensors").is_file():
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
      where = dict.fromkeys(f.keys(), "model.safetensors")
  else:
    raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor "
                            "model.safetensors.index.json (convert a .bin checkpoint first)")
  keep = {k: v for k, v in where.items() if not k.startswith(ignore)}
  if "shared.weight" in keep:
    keep.pop(_EMBED_ALIAS, None)  # the same tensor again
  out = {}
  for name in sorted(set(keep.values())):
    with safe_open(str(model_dir / name), framework="np") as f:
      out.update({k: f.get_tensor(k) for k, file in keep.items() if file == name})
  return out


class T5Tokenizer(WordPieceTokenizer):
  """A T5 / mT5 `tokenizer.json` (SentencePiece Unigram) run by `tokenizers`.

  As HF's `T5Tokenizer` does, whatever the file's post-processor, every caption
  ends with `</s>` (id `eos_id`, kept when truncated); padding is `<pad>`, id 0.
  """

  def __init__(self, tokenizer_json: PathLike, eos_token: str = "</s>",
               pad_token: str = "<pad>"):
    """Reads `tokenizer_json`; raises a ValueError if it is not a T5 vocabulary."""
    from tokenizers import processors  # pylint: disable=g-import-not-at-top
    super().__init__(tokenizer_json, pad_token=pad_token)
    eos_id = self._tok.token_to_id(eos_token)
    if eos_id is None or self.pad_id != 0:
      raise ValueError(f"{tokenizer_json}: not a T5 tokenizer ({pad_token!r} must be id 0, "
                       f"is {self.pad_id}; {eos_token!r} must exist, is {eos_id})")
    self.eos_id = eos_id
    self._tok.post_processor = processors.TemplateProcessing(
        single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token],
        special_tokens=[(eos_token, eos_id)])


def load_pretrained(path: PathLike, *, normalize: bool = False, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32, ignore: tuple[str, ...] = DEFAULT_IGNORE
                    ) -> tuple[T5Encoder, dict[str, Any], T5Tokenizer]:
  """Loads a HF T5 checkpoint directory: module, params and tokenizer.

  Args:
    path: directory with `config.json`, `model.safetensors` (or shards and
      `model.safetensors.index.json`) and `tokenizer.json`, of a `T5EncoderModel` or
      a `T5ForConditionalGeneration` (whose decoder is not read).
    normalize: L2-normalise the pooled vector.
    dtype, param_dtype: compute and parameter dtypes (bfloat16 params halve the
      19 GB of T5-XXL's encoder).
    ignore: tensor name prefixes that may be present and unused (never read).

  Returns:
    `(module, params, tokenizer)`; `module.apply({"params": params}, ids, mask)`
    gives `(tokens [B, L, D], pooled [B, D])`.

  Raises:
    ValueError: not a supported T5, or the weights do not match the config.
    FileNotFoundError: a file is missing.
  """
  model_dir = pathlib.Path(path)
  # Fail before reading gigabytes of weights when a small file is missing.
  for name in ("config.json", "tokenizer.json"):
    if not (model_dir / name).is_file():
      raise FileNotFoundError(
          f"{model_dir} has no {name}. A Hugging Face T5 folder needs config.json, "
          "model.safetensors (or its index) and tokenizer.json; write them with "
          "`T5EncoderModel.from_pretrained(name).save_pretrained(dir)` and "
          "`AutoTokenizer.from_pretrained(name).save_pretrained(dir)`.")
  config = T5Config.from_hf_json(model_dir / "config.json")
  module = T5Encoder(config, normalize=normalize, dtype=dtype, param_dtype=param_dtype)
  params = params_from_state_dict(module, read_encoder_tensors(model_dir, ignore), ignore,
                                  str(model_dir))
  tokenizer = T5Tokenizer(model_dir / "tokenizer.json")
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but "
                     f"the model only {config.vocab_size} embeddings")
  return module, params, tokenizer
