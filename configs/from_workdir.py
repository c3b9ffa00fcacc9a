"""The config saved by a training run, so sample and eval modes can override fields.

  python -m diffusion_jax.main --mode=sample --workdir=DIR \
      --config=configs/from_workdir.py:DIR --config.sample.num_steps=20

Sections the saved config lacks (a run saved before they existed) are taken
from configs/default.py, so their fields can be overridden too.
"""
from configs import default
from diffusion_jax import checkpointing


def get_config(workdir):
  config = checkpointing.load_config(workdir)
  for section, value in default.get_config().items():
    if section not in config:
      config[section] = value
  return config
