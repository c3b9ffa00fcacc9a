"""Sample files in the layout common FID suites read: `.npz` with `arr_0` uint8 NHWC.

This is what OpenAI's guided-diffusion evaluator and improved-diffusion write
and read (`np.savez(path, arr_0)` of uint8 [N, H, W, C]), and what sample mode
writes, so our samples can be scored by those suites and theirs by us. Labels
(`labels` int [N]) or captions may ride along under their own keys.
"""
from __future__ import annotations

import os
import zipfile
from typing import Optional, Sequence

import numpy as np

IMAGES_KEY = "arr_0"


def open_npz(path: str, what: str) -> np.lib.npyio.NpzFile:
  """np.load of an .npz (no pickles), or ValueError saying `path` is not one.

  Args:
    path: the file (it must exist).
    what: what the file should be, for the message, e.g. "a sample file".
  """
  try:
    f = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    # numpy's own text misleads here (a text file "contains pickled data"); the
    # cause stays chained for the details.
    raise ValueError(f"{path!r} is not a readable .npz (np.load: {type(e).__name__}); it "
                     f"should be {what}.") from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f"{path!r} holds one bare array (.npy), not an .npz; it should be "
                     f"{what}.")
  return f


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
  """Returns `images` if it is uint8 [N, H, W, C] with C in {1, 3}; else raises.

  No silent conversion: a float array in [0, 1] or [-1, 1], or NCHW, scored as
  if it were uint8 NHWC would give a meaningless number.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8 in 0..255, got {images.dtype}; convert "
                     "[-1, 1] floats with diffusion_jax.run_logging.to_uint8.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    hint = " (it looks like NCHW: transpose to NHWC)" if (
        images.ndim == 4 and images.shape[1] in (1, 3)) else ""
    raise ValueError(f"{what} must be [N, H, W, C] with C = 1 or 3, got shape "
                     f"{images.shape}{hint}.")
  return images


def write_samples(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None,
                  captions: Optional[Sequence[str]] = None) -> str:
  """Writes `arr_0` (and `labels`, `captions`) atomically; returns the path written."""
  images = check_images(images)
  arrays = {IMAGES_KEY: images}
  if captions is not None:
    if len(captions) != images.shape[0]:
      raise ValueError(f"captions must be {images.shape[0]}, got {len(captions)}.")
    arrays["captions"] = np.asarray(list(captions), dtype=str)
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
      raise ValueError(f"labels must be [{images.shape[0]}], got {labels.shape}.")
    arrays["labels"] = labels
  if not path.endswith(".npz"):
    path += ".npz"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path[:-4] + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def read_samples(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Reads an evaluation-suite `.npz`.

  Returns:
    (images uint8 [N, H, W, C], labels [N] or None).

  Raises:
    FileNotFoundError, or ValueError naming what is wrong with the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No sample file {path!r}.")
  with open_npz(path, "a sample file (uint8 [N, H, W, C] under 'arr_0')") as f:
    if IMAGES_KEY not in f.files:
      raise ValueError(f"{path!r} has no '{IMAGES_KEY}' array (has {sorted(f.files)}); "
                       "sample files hold uint8 [N, H, W, C] images under 'arr_0'.")
    images = check_images(f[IMAGES_KEY], f"{path!r} arr_0")
    labels = f["labels"] if "labels" in f.files else None
  return images, labels
