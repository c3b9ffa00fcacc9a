"""Every config parses, validates and builds its model; CIFAR-10 runs a step."""
import importlib

import jax
import numpy as np
import pytest

from diffusion_jax import builders, config_lib, models, optim, parallel, sample, train

CONFIGS = ["default", "digits", "test", "cifar10", "celeba64", "celebahq256", "lsun_church256",
           "digits_cond", "imagenet64_cond", "shapes_text_glide", "shapes_text_frozen",
           "shapes_cascade_base16", "shapes_sr32", "text2image64", "sr64to256",
           "shapes_clip", "shapes_unclip_prior", "shapes_unclip_decoder",
           "unclip_prior_vitl14", "unclip_decoder64"]
# Parameter counts by jax.eval_shape; the DDPM paper's 35.7M and 114M.
PARAMS = {"cifar10": 35_746_307, "celebahq256": 113_673_219, "lsun_church256": 113_673_219}


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def _param_count(config):
  model = models.create_model(config.model, config.data.channels)
  params = jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  config = _load(name)
  config_lib.validate(config)
  count = _param_count(config)
  if name in PARAMS:
    assert count == PARAMS[name]


def test_validate_rejects_bad_values():
  config = _load("digits")
  config.diffusion.prediction = "score"
  with pytest.raises(ValueError, match="diffusion.prediction='score'; valid values: eps, x0, v"):
    config_lib.validate(config)
  config = _load("digits")
  config.sample.num_steps = 5000
  with pytest.raises(ValueError, match="sample.num_steps=5000"):
    config_lib.validate(config)


def test_cifar10_config_runs_one_step_on_mocked_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from diffusion_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = _load("cifar10")
  batch = 4  # one image per fake device keeps the 35.7M-parameter step quick
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  with tfds.testing.mock_data(num_examples=8):
    it = input_pipeline.create_train_iterator(config.data, batch, config.seed)
    images = next(it)
  assert images["image"].shape == (batch, 32, 32, 3)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  step = train.make_train_step(model, builders.make_schedule(config), tx, config, mesh)
  state, stats = step(state, parallel.to_global(images, mesh), jax.random.key(1))
  assert int(state.step) == 1
  assert np.isfinite(float(stats["loss"])) and float(stats["loss"]) > 0.1
  # Linear warm-up from 0: the first update uses lr = 2e-4 * 0 / 5000 (as the
  # DDPM code, whose warm-up factor is global_step / warmup from step 0).
  assert float(stats["lr"]) == 0.0
  state, stats = step(state, parallel.to_global(images, mesh), jax.random.key(1))
  assert float(stats["lr"]) == pytest.approx(2e-4 / 5000, rel=1e-3)


def test_saved_configs_without_sampler_conventions_keep_the_old_sampler():
  """A config saved before sample.timestep_spacing / sample.ddim_eps gets the
  behaviour it had; other conventions get their own sample file names."""
  saved = _load("test").to_dict()
  for key in ("timestep_spacing", "ddim_eps"):
    saved["sample"].pop(key)
  old = config_lib.over_defaults(saved)
  assert (old.sample.timestep_spacing, old.sample.ddim_eps) == ("uniform", "clipped")
  config_lib.validate(old)
  assert sample.sample_name(old, 7) == "ddim5_step7_seed0_n10"
  old.sample.timestep_spacing, old.sample.ddim_eps = "trailing", "raw"
  config_lib.validate(old)
  assert sample.sample_name(old, 7) == "ddim5_step7_seed0_n10_trailing_raweps"
