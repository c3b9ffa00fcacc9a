"""`shapes`: captioned images of one or two flat shapes, drawn offline.

A small text-to-image data set whose captions can be checked exactly: every
image is drawn from a handful of discrete attributes, on a fixed pixel grid,
with no anti-aliasing, so `evaluation/shapes_checker.py` can read the
attributes back from a (generated) image and compare them with the caption.

Vocabulary (the integer code of a word is its index):
  SHAPES    circle, square, triangle (apex up)
  COLOURS   red, green, blue, yellow, magenta, white: pure colours, every two
            at least 255 apart in RGB, on a black background
  SIZES     small (8x8 pixel bounding box), large (14x14)
  RELATIONS "to the left of", "above" (two-shape images only)

Captions follow one grammar, all lower case, no final full stop:
  "a {size} {colour} {shape}"
  "a {size} {colour} {shape} {relation} a {size} {colour} {shape}"
e.g. "a small red circle", "a large blue triangle above a small white square".
In a two-shape caption the first shape is the left (or top) one.

Layout: a single shape sits at the centre, shifted by up to JITTER pixels in x
and y. Two shapes split the image into halves along the relation's axis (left
and right for "to the left of", top and bottom for "above"); each shape sits in
the middle of its half, shifted by up to JITTER pixels as long as it keeps one
pixel clear of the image border and of the middle line (a large shape fills its
half along that axis and is not shifted). Shapes never overlap or touch.

What is stored, per example:
  image: uint8 [32, 32, 3].
  caption: Text, the caption above.
  num_shapes: int32, 1 or 2.
  shape, colour, size: int32 [2], codes of the first and second shape; -1 in
    the second slot of a one-shape image.
  relation: int32, code of the relation; -1 for a one-shape image.
  held_out: bool, whether any shape of the image has a (colour, shape) pair in
    HELD_OUT_COMBINATIONS.
  id: int32, the example's index within its split.

Splits: `train` (5,000 examples, seed 0) never shows a held-out (colour,
shape) pair; `test` (1,000 examples, seed 1) has 500 examples with at least
one held-out pair and 500 without, in random order. In each split an example
has two shapes with probability 1/2; the other attributes are uniform. On disk
TFDS orders each split by a fixed hash of the key (`id`), the same every build.

Build it with `tfds build shapes --imports diffusion_jax.datasets.shapes
--file_format=array_record` (needs apache-beam) or by calling
`download_and_prepare(file_format="array_record")` on the builder: seconds.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "white")
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [255, 0, 255], [255, 255, 255]], np.uint8)  # [colour, RGB]
BACKGROUND = np.array([0, 0, 0], np.uint8)
SIZES = ("small", "large")
SIZE_PIXELS = (8, 14)  # Side of each size's square bounding box.
RELATIONS = ("to the left of", "above")
MAX_SHAPES = 2
UNUSED = -1  # Value of an attribute that the image does not have.
JITTER = 2  # Largest shift, in pixels, of a shape from its nominal place.
ATTRIBUTE_KEYS = ("num_shapes", "shape", "colour", "size", "relation")
# (colour, shape) pairs never shown in train. One per shape and per colour, so
# every word on its own is still seen in train, only the pairing is new.
HELD_OUT_COMBINATIONS = (("red", "triangle"), ("green", "circle"),
                         ("blue", "square"))
NUM_TRAIN = 5000
NUM_TEST = 1000
TWO_SHAPE_PROBABILITY = 0.5
# Legacy RandomState on purpose: NumPy freezes its stream (NEP 19), so the data
# stay the same across NumPy versions; `default_rng` makes no such promise.
TRAIN_SEED = 0
TEST_SEED = 1

Attributes = dict[str, Any]  # ATTRIBUTE_KEYS -> int, or tuple of 2 ints.

_HELD_OUT_CODES = frozenset(
    (COLOURS.index(c), SHAPES.index(s)) for c, s in HELD_OUT_COMBINATIONS)


def held_out_combinations() -> tuple[tuple[str, str], ...]:
  """The (colour, shape) word pairs that appear only in the test split."""
  return HELD_OUT_COMBINATIONS


def normalise_attributes(attrs: Mapping[str, Any]) -> Attributes:
  """Checks one example's attributes; returns them as plain Python ints.

  Args:
    attrs: a mapping with ATTRIBUTE_KEYS (other keys, e.g. `image` of a stored
      example, are ignored); `shape`, `colour`, `size` of length 2.

  Returns:
    {"num_shapes": int, "shape": (int, int), "colour": (int, int),
     "size": (int, int), "relation": int}, so two results compare with `==`.

  Raises:
    ValueError: a key is missing, a code is out of range, or the unused slots
      of a one-shape example are not -1.
  """
  missing = [k for k in ATTRIBUTE_KEYS if k not in attrs]
  if missing:
    raise ValueError(f"Attributes lack {missing}; need {ATTRIBUTE_KEYS}.")
  out: Attributes = {"num_shapes": int(attrs["num_shapes"]),
                     "relation": int(attrs["relation"])}
  n = out["num_shapes"]
  if n not in (1, 2):
    raise ValueError(f"num_shapes must be 1 or 2, got {n}.")
  for key, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
    codes = tuple(int(v) for v in np.asarray(attrs[key]).reshape(-1))
    if len(codes) != MAX_SHAPES:
      raise ValueError(f"{key} must hold {MAX_SHAPES} codes, got {codes}.")
    if any(not 0 <= c < len(vocab) for c in codes[:n]) or any(
        c != UNUSED for c in codes[n:]):
      raise ValueError(f"{key}={codes} is not valid for {n} shape(s): codes "
                       f"0..{len(vocab) - 1}, then {UNUSED} for unused slots.")
    out[key] = codes
  valid_relations = range(len(RELATIONS)) if n == 2 else (UNUSED,)
  if out["relation"] not in valid_relations:
    raise ValueError(f"relation={out['relation']} is not valid for {n} "
                     f"shape(s); expected one of {list(valid_relations)}.")
  return out


def is_held_out(attrs: Mapping[str, Any]) -> bool:
  """Whether any shape of the example has a held-out (colour, shape) pair."""
  a = normalise_attributes(attrs)
  return any((a["colour"][i], a["shape"][i]) in _HELD_OUT_CODES
             for i in range(a["num_shapes"]))


def caption_from_attributes(attrs: Mapping[str, Any]) -> str:
  """The caption of one example, e.g. "a small red circle above a large white square"."""
  a = normalise_attributes(attrs)
  phrases = [f"a {SIZES[a['size'][i]]} {COLOURS[a['colour'][i]]} "
             f"{SHAPES[a['shape'][i]]}" for i in range(a["num_shapes"])]
  if a["num_shapes"] == 1:
    return phrases[0]
  return f"{phrases[0]} {RELATIONS[a['relation']]} {phrases[1]}"


_PHRASE = (f"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) "
           f"({'|'.join(SHAPES)})")
_CAPTION_RE = re.compile(
    f"{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?")


def parse_caption(caption: str | bytes) -> Attributes:
  """Reads a caption of the data set's grammar back into attributes.

  Case, surrounding and repeated white space, and one final full stop are
  forgiven; any other departure from the grammar is an error, so that a user's
  caption is never scored against attributes it does not state.

  Args:
    caption: e.g. "a large blue square to the left of a small yellow triangle"
      (bytes, as TFDS returns Text, are decoded as UTF-8).

  Returns:
    The attributes, as `normalise_attributes` returns them.

  Raises:
    ValueError: the caption does not follow the grammar.
  """
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  text = " ".join(caption.lower().split()).removesuffix(".").rstrip()
  match = _CAPTION_RE.fullmatch(text)
  if match is None:
    raise ValueError(
        f"Caption {caption!r} does not follow the shapes grammar 'a SIZE "
        "COLOUR SHAPE [RELATION a SIZE COLOUR SHAPE]' with SIZE in "
        f"{SIZES}, COLOUR in {COLOURS}, SHAPE in {SHAPES}, RELATION in "
        f"{RELATIONS}.")
  g = match.groups()
  n = 1 if g[3] is None else 2
  objects = [g[0:3], g[4:7]][:n]
  pad = (UNUSED,) * (MAX_SHAPES - n)
  return normalise_attributes({
      "num_shapes": n,
      "shape": tuple(SHAPES.index(o[2]) for o in objects) + pad,
      "colour": tuple(COLOURS.index(o[1]) for o in objects) + pad,
      "size": tuple(SIZES.index(o[0]) for o in objects) + pad,
      "relation": UNUSED if n == 1 else RELATIONS.index(g[3]),
  })


def shape_mask(shape: int, height: int, width: int) -> np.ndarray:
  """The pixels a shape covers when fitted to a height x width bounding box.

  The checker fits the same masks to the box of a found blob, so drawing and
  reading share one definition. Every mask touches all four sides of its box,
  so the box of a drawn shape is the box it was drawn in.

  Args:
    shape: code in SHAPES.
    height, width: size of the bounding box in pixels.

  Returns:
    bool [height, width].
  """
  # Pixel centres, in units of pixels from the box's top-left corner.
  y = np.arange(height)[:, None] + 0.5
  x = np.arange(width)[None, :] + 0.5
  if SHAPES[shape] == "square":
    return np.ones((height, width), bool)
  if SHAPES[shape] == "circle":  # An ellipse, for boxes that are not square.
    return ((x - width / 2) / (width / 2))**2 + (
        (y - height / 2) / (height / 2))**2 <= 1.0
  # Triangle, apex up: a row is judged at its lower edge (y + 0.5), so the
  # top row holds the apex's two pixels instead of being empty.
  # The tolerance keeps exact ties (e.g. |x - 4| = 1.5 in an 8x8 box) inside.
  half_width = (y + 0.5) / height * (width / 2)
  return np.abs(x - width / 2) <= half_width + 1e-9


def _start(size: int, lo: int, hi: int, rng: np.random.RandomState) -> int:
  """Random first pixel, along one axis, of a box of `size` centred in [lo, hi).

  The shift from the centre is at most JITTER and keeps the box one pixel
  clear of both ends of [lo, hi).
  """
  nominal = (lo + hi - size) // 2
  first = max(nominal - JITTER, lo + 1)
  last = min(nominal + JITTER, hi - 1 - size)
  return int(rng.randint(first, last + 1))


def draw(attrs: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
  """Draws one example's image; `rng` picks the jitter.

  Args:
    attrs: one example's attributes (see `normalise_attributes`).
    rng: source of the position jitter.

  Returns:
    uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]: BACKGROUND with the shapes in their
    PALETTE colours, no other values.
  """
  a = normalise_attributes(attrs)
  image = np.broadcast_to(BACKGROUND, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
  half = IMAGE_SIZE // 2
  for i in range(a["num_shapes"]):
    side = SIZE_PIXELS[a["size"][i]]
    if a["num_shapes"] == 1:
      along = (0, IMAGE_SIZE)
    else:  # Shape i takes half i along the relation's axis.
      along = (i * half, (i + 1) * half)
    across = (0, IMAGE_SIZE)
    first = _start(side, *along, rng)
    second = _start(side, *across, rng)
    # "to the left of" splits along x; "above" (and one shape) along y.
    top, left = (second, first) if a["relation"] == 0 else (first, second)
    mask = shape_mask(a["shape"][i], side, side)
    image[top:top + side, left:left + side][mask] = PALETTE[a["colour"][i]]
  return image


def sample_attributes(rng: np.random.RandomState) -> Attributes:
  """Random attributes: two shapes with TWO_SHAPE_PROBABILITY, else uniform."""
  n = 2 if rng.rand() < TWO_SHAPE_PROBABILITY else 1
  pad = (UNUSED,) * (MAX_SHAPES - n)
  # Draw order is fixed (count, then per slot shape/colour/size, then
  # relation): changing it changes every example after it.
  objects = [(rng.randint(len(SHAPES)), rng.randint(len(COLOURS)),
              rng.randint(len(SIZES))) for _ in range(n)]
  relation = rng.randint(len(RELATIONS)) if n == 2 else UNUSED
  return normalise_attributes({
      "num_shapes": n,
      "shape": tuple(o[0] for o in objects) + pad,
      "colour": tuple(o[1] for o in objects) + pad,
      "size": tuple(o[2] for o in objects) + pad,
      "relation": relation,
  })


def make_split(split: str) -> list[dict[str, Any]]:
  """All examples of a split, in id order, as the builder stores them.

  Args:
    split: "train" or "test".

  Returns:
    A list of dicts with the stored features (image uint8 [32, 32, 3],
    caption str, attributes as in `normalise_attributes`, held_out, id).
  """
  if split == "train":
    num, seed = NUM_TRAIN, TRAIN_SEED
    wanted = np.zeros(num, bool)
  elif split == "test":
    num, seed = NUM_TEST, TEST_SEED
    wanted = np.arange(num) < num // 2
  else:
    raise ValueError(f"Unknown split {split!r}; expected 'train' or 'test'.")
  rng = np.random.RandomState(seed)
  # Which test examples are held out is drawn first, then each example's
  # attributes are redrawn until they match: plain rejection sampling, which
  # keeps the attribute distribution uniform within each group.
  wanted = wanted[rng.permutation(num)]
  examples = []
  for i in range(num):
    attrs = sample_attributes(rng)
    while is_held_out(attrs) != wanted[i]:
      attrs = sample_attributes(rng)
    examples.append({
        "image": draw(attrs, rng), "caption": caption_from_attributes(attrs),
        **attrs, "held_out": bool(wanted[i]), "id": i})
  return examples


class Shapes(tfds.core.GeneratorBasedBuilder):
  """One or two coloured shapes on black, 32x32, with exact captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 5,000 train / 1,000 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    pair = tfds.features.Tensor(shape=(MAX_SHAPES,), dtype=np.int32)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "num_shapes": tfds.features.Scalar(dtype=np.int32),
            "shape": pair,
            "colour": pair,
            "size": pair,
            "relation": tfds.features.Scalar(dtype=np.int32),
            "held_out": tfds.features.Scalar(dtype=np.bool_),
            "id": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "caption"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: every image is drawn here.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    for example in make_split(split):
      yield example["id"], {
          **example,
          **{k: np.asarray(example[k], np.int32)
             for k in ("shape", "colour", "size")}}
