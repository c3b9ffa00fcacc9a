"""Test set-up: 4 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep TensorFlow (used by TFDS to prepare data) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402  (after the environment is set)

from diffusion_jax import xla_flags  # noqa: E402

# The XLA flags main.py sets, so tests compile what users run.
xla_flags.apply_defaults()


def apply_overrides(config, **overrides):
  """Sets config[section][field] for each `section__field=value`; returns config."""
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def perturbed_params(model, config):
  """Init params with every leaf perturbed by N(0, 0.05^2).

  DDPM zero-initialises each ResBlock's last conv and conv_out, which would hide
  an input's effect on the output; tests of conditioning paths use these.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after the environment is set)
  from diffusion_jax import builders  # pylint: disable=g-import-not-at-top
  params = jax.jit(lambda: builders.init_params(model, config, jax.random.key(0)))()
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves, keys)])


def _prepared(tmp_path_factory, name: str, config) -> str:
  """A fresh TFDS data_dir with the offline set of `config.data` built in it."""
  from diffusion_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp(name))
  config.data.data_dir = data_dir
  input_pipeline.prepare_dataset(config.data)
  return data_dir


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with the offline digits set built once per session."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  return _prepared(tmp_path_factory, "tfds", test_config.get_config())


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A TFDS data_dir with the offline captioned `shapes` set built once per session."""
  from configs import shapes_text_glide  # pylint: disable=g-import-not-at-top
  return _prepared(tmp_path_factory, "tfds_shapes", shapes_text_glide.get_config())
