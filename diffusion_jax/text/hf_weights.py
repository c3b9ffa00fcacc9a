"""Hugging Face (PyTorch) tensors <-> the Flax params of a text encoder.

Each encoder (`bert.py`, `t5.py`) names a Flax param path after its HF tensor with its
own `hf_name`; what they share lives here: the module's abstract params, and the
layout rule between them (a torch `Linear` weight is `[out, in]`, the transpose of a
Flax `Dense` kernel; embeddings and norm scales are stored alike).
"""
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
NameFn = Callable[[Path], str]


def abstract_params(module: Any) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flattened param shapes of an encoder with `init(key, ids [B, L], mask [B, L])`,
  from `jax.eval_shape`: no parameter is materialised."""
  dummy = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy, dummy.astype(bool))
  return traverse_util.flatten_dict(abstract["params"])


def _to_hf(path: Path, array):
  return array.T if path[-1] == "kernel" else array


def hf_shapes(abstract: Mapping[Path, Any], hf_name: NameFn) -> dict[str, tuple[int, ...]]:
  """HF name -> the shape the module expects, in HF layout (Linear weights `[out, in]`)."""
  return {hf_name(p): tuple(leaf.shape[::-1] if p[-1] == "kernel" else leaf.shape)
          for p, leaf in abstract.items()}


def params_from_hf(abstract: Mapping[Path, Any], found: Mapping[str, Any], hf_name: NameFn,
                   param_dtype) -> dict[str, Any]:
  """The `params` collection from HF-named arrays whose names and shapes are checked."""
  flat = {p: jnp.asarray(_to_hf(p, np.asarray(found[hf_name(p)])), param_dtype)
          for p in abstract}
  return traverse_util.unflatten_dict(flat)


def state_from_params(params: Mapping[str, Any], hf_name: NameFn) -> dict[str, np.ndarray]:
  """The inverse: Flax params -> HF-named float32 numpy arrays (contiguous, for saving)."""
  # np.ascontiguousarray makes a 0-d array 1-d (a CLIP's logit_scale): keep the shape.
  return {hf_name(p): np.ascontiguousarray(a).reshape(a.shape)
          for p, a in ((p, _to_hf(p, np.asarray(leaf, np.float32)))
                       for p, leaf in traverse_util.flatten_dict(params).items())}
