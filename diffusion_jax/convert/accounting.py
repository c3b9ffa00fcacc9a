"""Every tensor accounted for: nested parameter dicts flattened, and the error that
lists what a checkpoint lacks, has over, or holds in another shape."""
from __future__ import annotations

from typing import Any, Mapping



class ConversionError(ValueError):
  """A checkpoint or config that cannot be represented exactly here."""


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  """{"a": {"b": x}} -> {("a", "b"): x}."""
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, prefix + (k,)) if isinstance(v, Mapping) else {prefix + (k,): v})
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """The inverse of `flatten`."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def check_accounted(header: str, missing: list, unused: list, wrong: list,
                    hint: str = "") -> None:
  """Raises ConversionError listing (up to 6 of) each kind of mismatch, if any."""
  if not (missing or unused or wrong):
    return
  lines = [header]
  for what, items in (("missing", missing), ("unused", unused), ("wrong shape", wrong)):
    if items:
      more = f" ... and {len(items) - 6} more" if len(items) > 6 else ""
      lines.append(f"  {len(items)} {what}: " + "; ".join(items[:6]) + more)
  if hint:
    lines.append(hint)
  raise ConversionError("\n".join(lines))
