"""What a checkpoint holds, compared with what a config builds.

A resumed run whose config builds another parameter or optimiser tree (a new
optimiser, a wider model) must stop with an error that names the difference,
never be mistaken for a damaged checkpoint. These functions compare the saved
tree (read from Orbax metadata, no array data) with the config's abstract
state, and the saved config.json with the current config.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

# Config fields that never change what a checkpoint holds; left out of the
# "settings that differ" hint so it shows only plausible causes.
RUN_ONLY_FIELDS = ("data.data_dir", "training.", "sample.", "eval.", "seed")
MAX_LINES = 12


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"opt_state.1.inner_state.0.mu.conv_in.kernel": (shape, dtype)} per array.

  Paths are written as Orbax names them: dict keys and named-tuple fields by
  name, sequence entries by index; empty nodes (optax's EmptyState, None)
  hold no arrays and do not appear, in the saved tree or in the config's.

  Args:
    tree: a pytree whose leaves have `.shape` and `.dtype` (jax arrays,
      ShapeDtypeStructs, Orbax ArrayMetadata).
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path):
          (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in leaves}


def subtree(signature: dict, prefix: str) -> dict:
  """The entries of `signature` under `prefix` (keeping the full paths)."""
  return {k: v for k, v in signature.items() if k == prefix or k.startswith(prefix + ".")}


def _shape(entry: tuple) -> str:
  return f"{list(entry[0])} {entry[1]}"


def describe_difference(saved: dict, wanted: dict) -> list[str]:
  """Lines naming each array that is missing, extra or of another shape/dtype."""
  only_wanted = sorted(set(wanted) - set(saved))
  only_saved = sorted(set(saved) - set(wanted))
  changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  lines = [f"  {k}: checkpoint {_shape(saved[k])}, config {_shape(wanted[k])}"
           for k in changed]
  lines += [f"  {k}: built by the config, not in the checkpoint" for k in only_wanted]
  lines += [f"  {k}: in the checkpoint, not built by the config" for k in only_saved]
  if len(lines) > MAX_LINES:
    lines = lines[:MAX_LINES] + [f"  ... and {len(lines) - MAX_LINES} more arrays"]
  return lines


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for a nested dict; tuples become lists (as in JSON)."""
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def _run_only(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RUN_ONLY_FIELDS)


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for fields that could change the state."""
  saved, current = flatten(saved), flatten(current)
  keys: Iterable[str] = sorted(set(saved) | set(current))
  return [(k, saved.get(k, "<missing>"), current.get(k, "<missing>")) for k in keys
          if saved.get(k) != current.get(k) and not _run_only(k)]


def override_flag(field: str, value: Any) -> str:
  """The --config override that sets `field` back to `value`."""
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
  return f"--config.{field}={value}"
