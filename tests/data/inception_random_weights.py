"""Seeded random FID-Inception weights, the same in the torch venv and in the tests.

The real weights (about 96 MB) are too large to ship, so
`make_inception_reference.py` (torch) and `tests/test_inception_reference.py`
(JAX) both draw every array here, from numpy alone. Each array has its own
generator, seeded by (`seed`, CRC-32 of its PyTorch name), so the values do not
depend on the order in which a caller lists the layout (the torch state dict
or `inception.expected_layout()`).

Scales keep activations O(1) through the 47 conv + BN layers of the deepest
path (measured: the RMS of every block's output stays in 0.39-0.91; pool3 mean
0.37, max 3.5, 13% zeros):

* `*.conv.weight` [O, I, kh, kw]: He-uniform, U(-a, a) with a = sqrt(6 / fan_in);
* `*.bn.running_var`: U(0.5, 1.5); `*.bn.weight` (gamma): U(0.6, 1.1), so that
  E[gamma^2 / var] is about 0.82 and the scale drifts slowly rather than
  growing by 10% a layer (E[1 / var] = ln 3 = 1.10);
* `*.bn.running_mean`: U(-0.1, 0.1); `*.bn.bias` (beta): U(0, 0.2), so ReLUs
  stay about half open;
* `fc.weight` [1008, 2048]: U(-a, a) with a = sqrt(3 / 2048) (variance
  1 / fan_in); `fc.bias`: U(-0.1, 0.1).
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np

SEED = 0


def _uniform(rng: np.random.Generator, shape, low: float, high: float) -> np.ndarray:
  return (low + (high - low) * rng.random(shape)).astype(np.float32)


def random_array(key: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
  """The float32 array named `key` (a PyTorch state-dict name) of `shape`."""
  rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
  if key.endswith("conv.weight") or key == "fc.weight":
    fan_in = int(np.prod(shape[1:]))
    a = np.sqrt((6.0 if key.endswith("conv.weight") else 3.0) / fan_in)
    return _uniform(rng, shape, -a, a)
  ranges = {"bn.running_var": (0.5, 1.5), "bn.weight": (0.6, 1.1),
            "bn.running_mean": (-0.1, 0.1), "bn.bias": (0.0, 0.2), "fc.bias": (-0.1, 0.1)}
  for suffix, (low, high) in ranges.items():
    if key.endswith(suffix):
      return _uniform(rng, shape, low, high)
  raise ValueError(f"No rule for {key!r}: not a FID Inception weight name.")


def random_weights(layout: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
  """PyTorch name -> float32 array, for every name in `layout` (name -> shape)."""
  return {key: random_array(key, tuple(shape), seed) for key, shape in layout.items()}


def checksum(weights: dict[str, np.ndarray]) -> str:
  """sha256 over the names, shapes and float32 bytes, in sorted name order."""
  h = hashlib.sha256()
  for key in sorted(weights):
    value = np.ascontiguousarray(weights[key], np.float32)
    h.update(f"{key}{value.shape}".encode())
    h.update(value.tobytes())
  return h.hexdigest()
