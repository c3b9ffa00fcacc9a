"""The two helpers every config check uses: a condition, and a value from a list."""
from __future__ import annotations


def require(ok: bool, message: str) -> None:
  """Raises ValueError("Bad config: <message>") unless `ok`."""
  if not ok:
    raise ValueError(f"Bad config: {message}")


def one_of(name: str, value, valid) -> None:
  """Raises ValueError unless `value` is one of `valid`, naming the field."""
  require(value in valid, f"{name}={value!r}; valid values: {', '.join(map(str, valid))}.")
