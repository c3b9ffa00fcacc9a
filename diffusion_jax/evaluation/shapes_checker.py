"""Exact caption checker for the `shapes` data set (datasets/shapes.py).

`decode` reads the attributes of a caption back from an image by plain pixel
analysis, no learned model:

  1. colour: each pixel takes the nearest of the background and the six
     PALETTE colours, if it lies within MAX_COLOUR_DISTANCE of it (RGB, 0..255
     units); pixels farther from all of them (blurred edges, mixed colours)
     count as background. Palette colours are >= 255 apart, so the nearest
     colour is never ambiguous within that distance.
  2. shapes: 8-connected blobs of one colour with at least MIN_AREA pixels;
     the two largest are read, but all of them are counted.
  3. size: small if the longer side of the blob's bounding box is below
     SIZE_THRESHOLD (drawn boxes are 8 and 14 pixels).
  4. shape: the circle, square and triangle masks of `shapes.shape_mask`,
     fitted to the blob's bounding box; the one with the highest IoU with the
     blob wins (on the data set's own images the right one has IoU 1).
  5. relation: from the two blobs' centroids, "to the left of" if they are
     further apart in x than in y, else "above"; the first slot holds the left
     (or top) blob, as the first shape of a caption is.

`score` compares decoded attributes with a caption's, slot by slot: "a red
circle to the left of a blue square" drawn the other way round gets the
relation right but the shapes and colours of both slots wrong, since which
shape is where is what the caption says.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from diffusion_jax.datasets import shapes

MAX_COLOUR_DISTANCE = 115.0  # < 127.5, half the least distance of two colours.
MIN_AREA = 12  # Pixels; the smallest drawn shape (small triangle) has 40.
SIZE_THRESHOLD = 11  # Box side in pixels between small (8) and large (14).
_CHUNK = 512  # Images per vectorised colour pass, to bound memory.
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_PER_SHAPE = ("shape", "colour", "size")
ATTRIBUTE_NAMES = ("count", "shape", "colour", "size", "relation", "caption")


def check_images(images: np.ndarray) -> np.ndarray:
  """Returns `images` if uint8 [N, 32, 32, 3]; raises ValueError otherwise."""
  images = np.asarray(images)
  side = shapes.IMAGE_SIZE
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 in 0..255, got {images.dtype}; "
                     "convert [-1, 1] floats with diffusion_jax.run_logging.to_uint8.")
  if images.ndim != 4 or images.shape[1:] != (side, side, 3):
    raise ValueError(f"images must be [N, {side}, {side}, 3] (NHWC RGB), got "
                     f"shape {images.shape}.")
  return images


def classify_pixels(images: np.ndarray) -> np.ndarray:
  """Colour code of every pixel: 0..5 (COLOURS), -1 background or unclear.

  Args:
    images: uint8 [N, 32, 32, 3].

  Returns:
    int8 [N, 32, 32].
  """
  images = check_images(images)
  # Row 0 is the background, rows 1.. the palette: argmin - 1 is the code.
  refs = np.concatenate([shapes.BACKGROUND[None], shapes.PALETTE]).astype(
      np.float32)
  codes = np.empty(images.shape[:3], np.int8)
  for start in range(0, len(images), _CHUNK):
    chunk = images[start:start + _CHUNK].astype(np.float32)
    dist = np.linalg.norm(chunk[..., None, :] - refs, axis=-1)  # [n,H,W,7]
    nearest = dist.argmin(axis=-1)
    clear = np.take_along_axis(dist, nearest[..., None], -1)[..., 0] <= (
        MAX_COLOUR_DISTANCE)
    codes[start:start + _CHUNK] = np.where(clear, nearest - 1, -1)
  return codes


@functools.lru_cache(maxsize=None)
def _templates(height: int, width: int) -> np.ndarray:
  """bool [3, height, width]: each shape's mask fitted to the box."""
  return np.stack([shapes.shape_mask(s, height, width)
                   for s in range(len(shapes.SHAPES))])


def _blobs(codes: np.ndarray) -> list[dict[str, Any]]:
  """Connected one-colour blobs of one image, largest first.

  Args:
    codes: int8 [32, 32] from `classify_pixels`.

  Returns:
    One dict per blob with at least MIN_AREA pixels: colour, area, box (a
    pair of slices), centroid (y, x), mask (bool, the box's size).
  """
  found = []
  for colour in np.unique(codes[codes >= 0]):
    labels, _ = ndimage.label(codes == colour, structure=_EIGHT_CONNECTED)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
      mask = labels[box] == index
      area = int(mask.sum())
      if area < MIN_AREA:  # Specks of noise, not shapes.
        continue
      ys, xs = np.nonzero(mask)
      found.append({
          "colour": int(colour), "area": area, "box": box, "mask": mask,
          "centroid": (box[0].start + ys.mean(), box[1].start + xs.mean())})
  # Stable sort: equal areas keep colour-then-scan order, deterministically.
  return sorted(found, key=lambda b: -b["area"])


def _read_blob(blob: dict[str, Any]) -> tuple[int, int]:
  """(shape code, size code) of one blob."""
  mask = blob["mask"]
  templates = _templates(*mask.shape)
  intersection = (templates & mask).sum(axis=(1, 2))
  union = (templates | mask).sum(axis=(1, 2))
  shape = int(np.argmax(intersection / union))
  size = int(max(mask.shape) >= SIZE_THRESHOLD)
  return shape, size


def _decode_one(codes: np.ndarray) -> dict[str, Any]:
  """Attributes of one image from its pixel codes (see `decode`)."""
  blobs = _blobs(codes)
  kept = blobs[:shapes.MAX_SHAPES]
  relation = shapes.UNUSED
  if len(kept) == 2:
    (y0, x0), (y1, x1) = kept[0]["centroid"], kept[1]["centroid"]
    relation = 0 if abs(x1 - x0) >= abs(y1 - y0) else 1
    # The first slot is the left (or upper) blob, as in a caption.
    axis = 1 if relation == 0 else 0
    kept = sorted(kept, key=lambda b: b["centroid"][axis])
  read = [_read_blob(b) for b in kept]
  pad = [shapes.UNUSED] * (shapes.MAX_SHAPES - len(kept))
  return {
      "num_shapes": len(blobs),
      "shape": [r[0] for r in read] + pad,
      "colour": [b["colour"] for b in kept] + pad,
      "size": [r[1] for r in read] + pad,
      "relation": relation,
  }


def decode(images: np.ndarray) -> dict[str, np.ndarray]:
  """Reads the caption attributes of images by pixel analysis.

  Args:
    images: uint8 [N, 32, 32, 3].

  Returns:
    {"num_shapes": int32 [N] (every blob found, possibly 0 or > 2),
     "shape", "colour", "size": int32 [N, 2] (the two largest blobs, left or
     top first; -1 where there is no blob), "relation": int32 [N] (-1 unless
     at least two blobs were found)}.

  Raises:
    ValueError: images are not uint8 [N, 32, 32, 3].
  """
  codes = classify_pixels(images)
  decoded = [_decode_one(c) for c in codes]
  out = {}
  for key in shapes.ATTRIBUTE_KEYS:
    # Explicit shapes, so that N = 0 gives [0, 2] and not [0].
    rows = (len(decoded), shapes.MAX_SHAPES) if key in _PER_SHAPE else (
        len(decoded),)
    out[key] = np.asarray([d[key] for d in decoded], np.int32).reshape(rows)
  return out


def stack_attributes(examples: Sequence[Mapping[str, Any] | str | bytes]
                     ) -> dict[str, np.ndarray]:
  """Per-example attributes (or captions, parsed) -> the batch form of `decode`.

  Raises:
    ValueError: an entry is not valid attributes, or a caption is not of the
      data set's grammar.
  """
  rows = [shapes.parse_caption(e) if isinstance(e, (str, bytes))
          else shapes.normalise_attributes(e) for e in examples]
  if not rows:
    raise ValueError("No examples to stack.")
  return {k: np.asarray([r[k] for r in rows], np.int32)
          for k in shapes.ATTRIBUTE_KEYS}


def _as_batch(attrs: Any, num: int) -> dict[str, np.ndarray]:
  """Validated batch form of `attrs` (a batch Mapping or a sequence)."""
  if isinstance(attrs, Mapping):
    # Row by row through normalise_attributes, so bad codes raise here too.
    attrs = [{k: attrs[k][i] for k in shapes.ATTRIBUTE_KEYS}
             for i in range(len(np.asarray(attrs["num_shapes"])))]
  batch = stack_attributes(attrs)
  if len(batch["num_shapes"]) != num:
    raise ValueError(f"{num} images but {len(batch['num_shapes'])} attributes.")
  return batch


def score(images: np.ndarray, attrs: Any) -> dict[str, float]:
  """How well images show their captions' attributes.

  Args:
    images: uint8 [N, 32, 32, 3].
    attrs: the target attributes: a batch mapping as `decode` returns (e.g.
      stored features stacked), or a sequence of per-example attribute
      mappings or of captions.

  Returns:
    Fractions in [0, 1], as floats:
      count: the number of shapes is right;
      shape, colour, size: per shape of the caption, over all its shapes;
      relation: over two-shape captions only (nan if there are none);
      caption: every attribute of the caption right and no extra shape.

  Raises:
    ValueError: bad images, bad attributes, or different lengths.
  """
  images = check_images(images)
  target = _as_batch(attrs, len(images))
  pred = decode(images)
  count_ok = pred["num_shapes"] == target["num_shapes"]
  slots = np.arange(shapes.MAX_SHAPES)[None] < target["num_shapes"][:, None]
  two = target["num_shapes"] == 2
  relation_ok = pred["relation"] == target["relation"]
  result = {"count": float(count_ok.mean())}
  all_ok = count_ok & relation_ok
  for key in _PER_SHAPE:
    ok = pred[key] == target[key]
    result[key] = float(ok[slots].mean())
    all_ok &= (ok | ~slots).all(axis=1)
  result["relation"] = float(relation_ok[two].mean()) if two.any() else float(
      "nan")
  result["caption"] = float(all_ok.mean())
  return {name: result[name] for name in ATTRIBUTE_NAMES}


def score_subsets(images: np.ndarray, attrs: Any, held_out: np.ndarray
                  ) -> dict[str, dict[str, float]]:
  """`score` on all images and separately on seen and held-out captions.

  Args:
    images: uint8 [N, 32, 32, 3].
    attrs: as for `score`.
    held_out: bool [N], e.g. the test split's `held_out` feature.

  Returns:
    {"all": ..., "seen": ..., "held_out": ...}, each as `score` returns it;
    a subset with no example is left out.
  """
  images = check_images(images)
  held_out = np.asarray(held_out, bool)
  if held_out.shape != (len(images),):
    raise ValueError(f"held_out must be bool [{len(images)}], got shape "
                     f"{held_out.shape}.")
  target = _as_batch(attrs, len(images))
  out = {"all": score(images, target)}
  for name, rows in (("seen", ~held_out), ("held_out", held_out)):
    if rows.any():
      out[name] = score(images[rows], {k: v[rows] for k, v in target.items()})
  return out
