"""Tests for the `shapes` data set (datasets/shapes.py) and its checker."""
import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import shapes_checker

SPLITS = {"train": shapes.NUM_TRAIN, "test": shapes.NUM_TEST}
KEYS = ("image", "caption", *shapes.ATTRIBUTE_KEYS, "held_out", "id")


def _build(data_dir) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("shapes", data_dir=str(data_dir))
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _read(builder, split: str) -> dict[str, np.ndarray]:
  """All examples of a split, sorted by id, stacked per feature."""
  source = builder.as_data_source(split=split)
  examples = sorted((source[i] for i in range(len(source))),
                    key=lambda e: e["id"])
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in KEYS}


def _rows(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  return [{k: v[i] for k, v in data.items()} for i in range(len(data["id"]))]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  """The data set built twice, into two separate data dirs."""
  return [_build(tmp_path_factory.mktemp(f"shapes_{i}")) for i in range(2)]


@pytest.fixture(scope="module")
def data(builds):
  return {split: _read(builds[0], split) for split in SPLITS}


def test_builder_and_features(builds, data):
  assert isinstance(builds[0], shapes.Shapes)
  assert str(builds[0].version) == "1.0.0"
  assert builds[0].info.file_format.value == "array_record"
  for split, size in SPLITS.items():
    assert builds[0].info.splits[split].num_examples == size
    d = data[split]
    assert d["image"].shape == (size, 32, 32, 3) and d["image"].dtype == np.uint8
    for key in ("shape", "colour", "size"):
      assert d[key].shape == (size, 2) and d[key].dtype == np.int32
    np.testing.assert_array_equal(d["id"], np.arange(size))
    assert d["held_out"].dtype == bool


def test_build_is_deterministic_and_matches_make_split(builds, data):
  for split in SPLITS:
    # Byte-identical files from two builds, not just equal decoded values.
    name = f"shapes-{split}.array_record-00000-of-00001"
    paths = [os.path.join(b.data_dir, name) for b in builds]
    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
      assert f0.read() == f1.read()
    # What is stored is exactly what make_split draws (PNG is lossless).
    for stored, drawn in zip(_rows(data[split]), shapes.make_split(split)):
      np.testing.assert_array_equal(stored["image"], drawn["image"])
      assert stored["caption"].decode() == drawn["caption"]
      assert shapes.normalise_attributes(stored) == shapes.normalise_attributes(
          drawn)


def test_captions_agree_with_stored_attributes(data):
  for split in SPLITS:
    for row in _rows(data[split]):
      assert shapes.parse_caption(row["caption"]) == (
          shapes.normalise_attributes(row)), row["caption"]


def test_held_out_pairs_only_in_test(data):
  held = {(shapes.COLOURS.index(c), shapes.SHAPES.index(s))
          for c, s in shapes.held_out_combinations()}

  def pairs(row):
    return {(row["colour"][i], row["shape"][i]) for i in range(row["num_shapes"])}

  train_pairs = set().union(*map(pairs, _rows(data["train"])))
  assert not train_pairs & held
  # Every other pair, and every word on its own, is seen in train.
  assert len(train_pairs) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(held)
  test_rows = _rows(data["test"])
  assert held <= set().union(*map(pairs, test_rows))
  for row in test_rows:
    assert bool(row["held_out"]) == bool(pairs(row) & held)
  assert data["test"]["held_out"].sum() == shapes.NUM_TEST // 2
  assert not data["train"]["held_out"].any()


def test_images_hold_only_background_and_palette(data):
  colours = np.concatenate([shapes.BACKGROUND[None], shapes.PALETTE])
  pixels = np.unique(data["test"]["image"].reshape(-1, 3), axis=0)
  assert {tuple(p) for p in pixels} <= {tuple(c) for c in colours}
  # Both counts and both relations occur in quantity.
  for split in SPLITS:
    assert 0.4 < (data[split]["num_shapes"] == 2).mean() < 0.6
    assert set(data[split]["relation"]) == {-1, 0, 1}


def test_caption_round_trip_over_every_attribute_combination():
  objects = list(itertools.product(range(3), range(6), range(2)))
  combos = [dict(num_shapes=1, shape=(s, -1), colour=(c, -1), size=(z, -1),
                 relation=-1) for s, c, z in objects]
  combos += [dict(num_shapes=2, shape=(a[0], b[0]), colour=(a[1], b[1]),
                  size=(a[2], b[2]), relation=r)
             for a, b, r in itertools.product(objects, objects, range(2))]
  captions = {shapes.caption_from_attributes(a) for a in combos}
  assert len(captions) == len(combos)  # No two attribute sets share a caption.
  for attrs in combos:
    caption = shapes.caption_from_attributes(attrs)
    assert shapes.parse_caption(caption) == attrs
  assert shapes.caption_from_attributes(combos[-1]) == (
      "a large white triangle above a large white triangle")


def test_parse_caption_forgives_only_case_spaces_and_full_stop():
  expected = shapes.parse_caption("a small red circle to the left of a large blue square")
  assert shapes.parse_caption(
      "  A Small RED circle  to the left of a large blue square. ") == expected
  assert shapes.parse_caption(b"a small red circle") == dict(
      num_shapes=1, shape=(0, -1), colour=(0, -1), size=(0, -1), relation=-1)
  for bad in ("a red circle", "a small red circle below a small red square",
              "a small purple circle", "small red circle", "a small red circle and"):
    with pytest.raises(ValueError, match="grammar"):
      shapes.parse_caption(bad)


def test_shape_masks_fill_their_boxes_and_differ():
  for side in shapes.SIZE_PIXELS:
    masks = [shapes.shape_mask(s, side, side) for s in range(3)]
    for mask in masks:  # Touches every side, so box of drawing == drawn box.
      assert mask[0].any() and mask[-1].any()
      assert mask[:, 0].any() and mask[:, -1].any()
    fills = [m.mean() for m in masks]
    assert fills[2] < fills[0] < fills[1] == 1.0  # triangle < circle < square


def test_checker_is_exact_on_real_images(data):
  d = data["test"]
  decoded = shapes_checker.decode(d["image"])
  for key in shapes.ATTRIBUTE_KEYS:
    np.testing.assert_array_equal(decoded[key], d[key])
  result = shapes_checker.score_subsets(d["image"], d, d["held_out"])
  for subset in ("all", "seen", "held_out"):
    assert result[subset]["caption"] >= 0.99, result
    assert all(isinstance(v, float) for v in result[subset].values())
  assert shapes_checker.score(data["train"]["image"][:500],
                              list(data["train"]["caption"][:500]))["caption"] == 1.0


def test_checker_tolerates_noise(data):
  images = data["test"]["image"]
  noise = np.random.RandomState(0).normal(0.0, 20.0, images.shape)
  noisy = np.clip(np.round(images + noise), 0, 255).astype(np.uint8)
  result = shapes_checker.score(noisy, data["test"])
  for name in shapes_checker.ATTRIBUTE_NAMES:
    assert result[name] >= 0.98, result


def test_checker_rejects_wrong_pairings(data):
  d = data["test"]
  perm = np.random.RandomState(0).permutation(len(d["id"]))
  shuffled = shapes_checker.score(d["image"], {k: v[perm] for k, v in d.items()})
  assert shuffled["caption"] < 0.5 and shuffled["colour"] < 0.5, shuffled
  # The same two shapes in swapped places: the relation word still matches,
  # but the caption does not (unless both shapes look the same).
  two = np.flatnonzero((d["num_shapes"] == 2)
                       & ((d["shape"][:, 0] != d["shape"][:, 1])
                          | (d["colour"][:, 0] != d["colour"][:, 1])
                          | (d["size"][:, 0] != d["size"][:, 1])))
  swapped = {k: v[two] for k, v in d.items()}
  for key in ("shape", "colour", "size"):
    swapped[key] = swapped[key][:, ::-1]
  result = shapes_checker.score(d["image"][two], swapped)
  assert result["relation"] == 1.0 and result["caption"] == 0.0, result


def test_checker_counts_missing_and_extra_shapes(data):
  d = data["test"]
  above = np.flatnonzero(d["relation"] == 1)[0]
  blank = np.zeros((32, 32, 3), np.uint8)
  extra = d["image"][above].copy()
  # Shapes of an "above" image keep >= 7 pixels from the sides: room for a
  # third, 4x4 white shape in the corner.
  extra[:4, :4] = 255
  decoded = shapes_checker.decode(np.stack([blank, extra]))
  assert decoded["num_shapes"].tolist() == [0, 3]
  result = shapes_checker.score(np.stack([blank, extra]),
                                [d["caption"][above]] * 2)
  assert result["count"] == 0.0 and result["caption"] == 0.0, result


def test_bad_input_raises_clear_errors(data):
  images = data["test"]["image"][:4]
  captions = list(data["test"]["caption"][:4])
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    shapes_checker.decode(images[0])
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    shapes_checker.decode(images[..., :1])
  with pytest.raises(ValueError, match="uint8"):
    shapes_checker.score(images.astype(np.float32) / 255, captions)
  with pytest.raises(ValueError, match="4 images but 3"):
    shapes_checker.score(images, captions[:3])
  with pytest.raises(ValueError, match="grammar"):
    shapes_checker.score(images, captions[:3] + ["a big red circle"])
  with pytest.raises(ValueError, match="relation"):
    shapes.normalise_attributes(dict(num_shapes=1, shape=(0, -1), colour=(0, -1),
                                     size=(0, -1), relation=0))
