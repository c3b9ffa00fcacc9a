"""Published checkpoints in and out: diffusers folders and DDPM's TensorFlow checkpoints.

`python -m diffusion_jax.convert --help` lists the commands (convert/__main__.py).
"""
