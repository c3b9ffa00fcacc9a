"""diffusion_jax: denoising diffusion models in JAX/Flax."""

__version__ = "0.1.0"
