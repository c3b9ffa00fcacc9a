"""The FID InceptionV3 in Flax: pytorch-fid's port of the 2015-12-05 TensorFlow graph.

FID and IS are only comparable across papers when computed with the network of
the original TensorFlow code (`inception-2015-12-05.tgz`). pytorch-fid ports it
as torchvision's InceptionV3 with patched blocks (FIDInceptionA/C/E_1/E_2: the
3x3 average pools ignore padding, the last block max-pools) and a 1008-way
classifier. This module is the same network, with parameter names that mirror
pytorch-fid's state dict, so its weights file loads key by key.

Weights (not shipped with any PyPI package): download pytorch-fid's
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and convert it once, on any machine with torch, with
  python -m diffusion_jax.evaluation.convert_inception_weights \
      pt_inception-2015-12-05-6726825d.pth inception_fid.npz
then set `config.eval.inception_weights=inception_fid.npz`. The .npz holds the
state dict's arrays under their PyTorch names and layouts (conv OIHW, fc
[out, in]); `load_params` checks every name and shape and transposes.

Input handling follows pytorch-fid: uint8 / 255, grayscale repeated to RGB,
bilinear resize to 299 x 299 (half-pixel centres, no antialiasing, as
`F.interpolate(align_corners=False)`), then scaled to [-1, 1].
Outputs: pool3 features [B, 2048] (FID, precision/recall) and the 1008
logits (Inception Score).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

POOL3_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # The smallest side the strided convs and pools accept.
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
NETWORK_NAME = "pytorch-fid InceptionV3 (TF inception-2015-12-05), pool3 2048-d"
_BN_EPS = 1e-3  # TF's batch-norm epsilon, kept by the port.
_zeros = nn.initializers.zeros  # Never trained here: weights always come from a file.


class BasicConv(nn.Module):
  """Conv (no bias) + inference batch norm + ReLU; pytorch-fid's BasicConv2d.

  Parameter names are the PyTorch sub-keys with '.' -> '_' (conv.weight ->
  conv_weight), so `<path>.conv.weight` in the state dict is `<path>/conv_weight`.
  """
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    w = self.param("conv_weight", _zeros, self.kernel + (x.shape[-1], self.features))
    c = (self.features,)
    scale, bias = self.param("bn_weight", _zeros, c), self.param("bn_bias", _zeros, c)
    mean, var = self.param("bn_running_mean", _zeros, c), self.param("bn_running_var", _zeros, c)
    (ph, pw) = self.padding
    y = jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = (y - mean) * (scale * jax.lax.rsqrt(var + _BN_EPS)) + bias
    return nn.relu(y)


def _avg_pool_same(x: jnp.ndarray) -> jnp.ndarray:
  # TF's average pool does not count the zero padding (the FID patch).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA): 35 x 35."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (FIDInceptionC): 17 x 17, factorised 7x7 convs."""
  c7: int

  @nn.compact
  def __call__(self, x):
    c7, row, col = self.c7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    for i, (kernel, pad) in enumerate((col, row, col), start=2):
      bd = BasicConv(c7, kernel, padding=pad, name=f"branch7x7dbl_{i}")(bd)
    bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    # The FID graph max-pools in its last block (a quirk pytorch-fid keeps).
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool
              else _avg_pool_same(x))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """uint8 [B, H, W, 1 or 3] -> float32 [B, size, size, 3] in [-1, 1], as pytorch-fid."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
  """uint8 images -> (pool3 [B, 2048], logits [B, 1008]).

  Attributes:
    input_size: side the images are resized to; 299 for FID. Tests use the
      minimum, 75, to run the same graph quickly.
  """
  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = preprocess(images, self.input_size)
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    w = self.param("fc_weight", _zeros, (POOL3_DIM, NUM_LOGITS))
    b = self.param("fc_bias", _zeros, (NUM_LOGITS,))
    return pool3, pool3 @ w + b


# ---------------------------------------------------------------------------
# Weights: PyTorch state-dict names and layouts <-> Flax parameters.


def _torch_key(path: tuple[str, ...]) -> str:
  # ("Mixed_5b", "branch1x1", "conv_weight") -> "Mixed_5b.branch1x1.conv.weight"
  return ".".join(path[:-1] + tuple(path[-1].split("_", 1)))


def _to_flax(key: str, array: np.ndarray) -> np.ndarray:
  if key.endswith("conv.weight"):
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if key == "fc.weight":
    return array.T  # [out, in] -> [in, out]
  return array


@functools.lru_cache(maxsize=1)
def expected_layout() -> dict[str, tuple[int, ...]]:
  """PyTorch key -> PyTorch shape of every array the weights file must hold."""
  shapes = jax.eval_shape(lambda: FIDInceptionV3(MIN_INPUT_SIZE).init(
      jax.random.key(0), jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.uint8)))
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes["params"]).items():
    key, shape = _torch_key(path), tuple(leaf.shape)
    if key.endswith("conv.weight"):
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif key == "fc.weight":
      shape = shape[::-1]
    out[key] = shape
  return out


def check_layout(arrays: dict[str, np.ndarray], source: str = "the weights file") -> None:
  """Raises ValueError listing every missing, unexpected or mis-shaped array."""
  expected = expected_layout()
  got = {k: tuple(np.shape(v)) for k, v in arrays.items()
         if not k.endswith("num_batches_tracked")}  # BN bookkeeping, unused
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  wrong = [f"{k}: file {got[k]}, expected {expected[k]}"
           for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
  if missing or unexpected or wrong:
    lines = [f"{source} is not the FID Inception weights (pytorch-fid's "
             f"{os.path.basename(WEIGHTS_URL)} converted with "
             "`python -m diffusion_jax.evaluation.convert_inception_weights`):"]
    for what, items in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong)):
      if items:
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        lines.append(f"  {len(items)} {what}: " + "; ".join(items[:8]) + more)
    raise ValueError("\n".join(lines))


def load_params(path: str) -> dict[str, Any]:
  """Reads, validates and converts a weights .npz to this module's params.

  Raises:
    FileNotFoundError: no file (the message says where to get it).
    ValueError: a .pth given directly, or any name/shape mismatch, or
      non-finite values.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights file {path!r} does not exist. Download {WEIGHTS_URL} and "
        "convert it with `python -m diffusion_jax.evaluation.convert_inception_weights "
        "IN.pth OUT.npz` (needs torch), then set config.eval.inception_weights=OUT.npz.")
  if not path.endswith(".npz"):
    raise ValueError(f"{path!r}: expected the converted .npz; convert a .pth with `python "
                     "-m diffusion_jax.evaluation.convert_inception_weights IN.pth OUT.npz`.")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  check_layout(arrays, repr(path))
  flat = {}
  for key in expected_layout():
    value = np.asarray(arrays[key], np.float32)
    if not np.isfinite(value).all():
      raise ValueError(f"{path!r}: {key} has non-finite values.")
    path_ = tuple(key.split("."))
    flat[path_[:-2] + (f"{path_[-2]}_{path_[-1]}",)] = _to_flax(key, value)
  return traverse_util.unflatten_dict(flat)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _jitted_apply(input_size: int):
  # One jitted function per input size, shared by every InceptionFeatures, so a
  # second extractor (e.g. a second eval in one process) reuses the compile.
  model = FIDInceptionV3(input_size)
  return jax.jit(lambda p, x: model.apply({"params": p}, x))


class InceptionFeatures:
  """Batched pool3 features and logits of uint8 images with loaded weights.

  Runs on this process's local devices (every process computes the same
  features from the same images), with the batch split over them.
  """

  def __init__(self, weights_path: str, batch_size: int = 200,
               input_size: int = INPUT_SIZE, params: Optional[dict] = None):
    """Loads and checks the weights.

    Args:
      weights_path: the converted .npz (see the module docstring).
      batch_size: images per device call, rounded down to a multiple of the
        local device count; every call has this shape (the last batch is padded).
      input_size: side images are resized to; 299 for comparable FID/IS.
      params: already loaded params (skips reading `weights_path` again).
    """
    self.weights_path = weights_path
    self._sha256 = None
    self.params = load_params(weights_path) if params is None else params
    devices = jax.local_devices()
    self.batch_size = max(len(devices), batch_size // len(devices) * len(devices))
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self._data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self.params = jax.device_put(self.params, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    self._apply = _jitted_apply(input_size)

  def describe(self) -> dict[str, Any]:
    """What a report must say about the network: name, weights file and its hash."""
    if self._sha256 is None:
      self._sha256 = file_sha256(self.weights_path)
    return {"name": NETWORK_NAME, "weights": os.path.abspath(self.weights_path),
            "weights_sha256": self._sha256}

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, C] -> (pool3 float32 [N, 2048], logits float32 [N, 1008])."""
    pools, logits = [], []
    for start in range(0, len(images), self.batch_size):
      batch = np.asarray(images[start:start + self.batch_size])
      n = len(batch)
      if n < self.batch_size:  # pad so one compiled shape serves every batch
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, 0)])
      p, l = self._apply(self.params, jax.device_put(batch, self._data))
      pools.append(np.asarray(p)[:n])
      logits.append(np.asarray(l)[:n])
    return np.concatenate(pools), np.concatenate(logits)
