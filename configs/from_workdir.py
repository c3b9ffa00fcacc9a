"""The config saved by a training run, so sample mode can override fields.

  python -m diffusion_jax.main --mode=sample --workdir=DIR \
      --config=configs/from_workdir.py:DIR --config.sample.num_steps=20
"""
from diffusion_jax import checkpointing


def get_config(workdir):
  return checkpointing.load_config(workdir)
