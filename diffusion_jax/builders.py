"""What every run mode builds from a config: schedule, image shape, parameters.

Training, sampling, evaluation, cascades, tests and benchmarks share these;
none of them needs the sampling mode (`sample.py`) for it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import checkpointing, models, parallel, schedules
from diffusion_jax.conditioning import init_cond
from diffusion_jax.schedules import Schedule


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The noise schedule of `config.diffusion`."""
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images a config trains on and samples."""
  return (config.data.image_size, config.data.image_size, config.data.channels)


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shape of one diffused (and sampled) example: an image, or for the unCLIP
  prior (model.name="prior") a CLIP image embedding (D,)."""
  if config.model.name == "prior":
    return (config.model.prior.embed_dim,)
  return image_shape(config)


def init_params(model, config: ml_collections.ConfigDict, rng: jax.Array):
  """The model's initial parameters, from a dummy batch of one example."""
  if config.model.name == "clip":
    pixels = jnp.zeros((1,) + image_shape(config), jnp.float32)
    ids = jnp.zeros((1, config.model.clip.context_length), jnp.int32)
    return model.init(rng, pixels, ids, ids > -1)["params"]
  x = jnp.zeros((1,) + sample_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init(rng, x, t, init_cond(config), train=False)["params"]


def abstract_params(model, config: ml_collections.ConfigDict, mesh):
  """Parameter shapes (jax.ShapeDtypeStruct, replicated) without allocating."""
  shapes = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)


def restore_ema(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None):
  """The model of `config` and the EMA parameters of a workdir's checkpoint.

  Args:
    config: the run config (model, data).
    workdir: the training run's workdir.
    step: the checkpoint step; None or -1 means the latest.

  Returns:
    (model, ema_params replicated over the mesh, step, mesh).
  """
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  params, step = ckpt.restore_ema_params(abstract_params(model, config, mesh), step)
  ckpt.close()
  return model, params, step, mesh
