"""The one complete config (every field commented): `diffusion_jax/default_config.py`.

It lives inside the package so that installed code finds the defaults; this
file is the config-file entry point, `--config=configs/default.py`, and what
the other files in configs/ import and override.
"""
from diffusion_jax.default_config import get_config  # noqa: F401
