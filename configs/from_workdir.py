"""The config saved by a training run, so sample and eval modes can override fields.

  python -m diffusion_jax.main --mode=sample --workdir=DIR \
      --config=configs/from_workdir.py:DIR --config.sample.num_steps=20

Fields the saved config lacks (a run saved before they existed) take their
defaults (checkpointing.load_config lays it over diffusion_jax/default_config.py),
so they can be overridden too.
"""
from diffusion_jax import checkpointing


def get_config(workdir):
  return checkpointing.load_config(workdir)
