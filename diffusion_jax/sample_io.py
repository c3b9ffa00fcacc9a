"""Writing samples: the .npz (FID suites' layout) and PNG grids.

`save_samples` writes `<name>.npz` with `arr_0` uint8 [N, H, W, C] (what FID
suites read), `labels` int32 [N] for class-conditional samples and
`captions` (unicode [N]) for text-conditional ones, and `<name>.png`: one
class per row when labelled, each caption printed under its image when
captioned.
"""
from __future__ import annotations

import os
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_jax import run_logging

_CHAR_PX, _LINE_PX = 6, 11  # PIL's built-in bitmap font: width per char, line height


def save_grid(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None,
              max_rows: int = 100, max_cols: int = 16) -> np.ndarray:
  """Writes a PNG grid: one class per row (sorted) when labels are given.

  Args:
    path: the .png to write.
    images: uint8 [N, H, W, C].
    labels: int32 [N] or None (then the first 256 images, square).
    max_rows: most classes shown (the lowest indices).
    max_cols: most images per class.

  Returns:
    The grid before upscaling, uint8 [H', W', C].
  """
  upscale = max(1, 64 // images.shape[1])
  if labels is None:
    tiles, ncol = images[:256], None
  else:
    classes = np.unique(labels)[:max_rows]
    ncol = min(max_cols, max(int(np.sum(labels == c)) for c in classes))
    tiles = np.zeros((len(classes) * ncol,) + images.shape[1:], np.uint8)
    for r, c in enumerate(classes):
      row = images[labels == c][:ncol]
      tiles[r * ncol:r * ncol + len(row)] = row
  grid = run_logging.make_grid(tiles, nrow=ncol)
  run_logging.save_image_grid(path, tiles, nrow=ncol, upscale=upscale)
  return grid


def save_captioned_grid(path: str, images: np.ndarray, captions: Sequence[str],
                        max_images: int = 64, ncol: int = 8) -> np.ndarray:
  """Writes a PNG grid with each caption printed (wrapped) under its image.

  Args:
    path: the .png to write.
    images: uint8 [N, H, W, C].
    captions: N strings.
    max_images: the first this many are shown.
    ncol: images per row.

  Returns:
    The grid, uint8 [H', W', 3].
  """
  images, captions = images[:max_images], list(captions)[:max_images]
  upscale = max(1, 128 // images.shape[1])
  size = images.shape[1] * upscale
  lines = [textwrap.wrap(c, max(1, size // _CHAR_PX)) or [""] for c in captions]
  text_h = _LINE_PX * max(len(l) for l in lines) + 4
  nrow = -(-len(images) // ncol)
  canvas = Image.new("RGB", (ncol * (size + 4), nrow * (size + text_h + 4)), "white")
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for i, (image, text) in enumerate(zip(images, lines)):
    x, y = (i % ncol) * (size + 4) + 2, (i // ncol) * (size + text_h + 4) + 2
    tile = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
    tile = np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile
    canvas.paste(Image.fromarray(tile), (x, y))
    for j, line in enumerate(text):
      draw.text((x, y + size + 2 + j * _LINE_PX), line, fill="black", font=font)
  canvas.save(path)
  return np.asarray(canvas)


def save_samples(directory: str, name: str, images: np.ndarray,
                 labels: Optional[np.ndarray] = None,
                 captions: Optional[Sequence[str]] = None,
                 extra: Optional[dict[str, np.ndarray]] = None) -> str:
  """Writes <name>.npz (arr_0 uint8 NHWC, `labels` int32 [N] and `captions` str [N]
  if given, and the `extra` arrays, e.g. unCLIP's `image_embeds`) and <name>.png;
  returns the npz path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name + ".npz")
  tmp = path + ".tmp.npz"
  arrays = dict(arr_0=images)
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int32)
  if captions is not None:
    arrays["captions"] = np.asarray(list(captions), dtype=str)
  arrays.update(extra or {})
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # never leave a half-written result under the real name
  png = os.path.join(directory, name + ".png")
  if captions is not None:
    save_captioned_grid(png, images, captions)
  else:
    save_grid(png, images, labels)
  return path


