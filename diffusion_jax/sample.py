"""Sampling from a trained model: the sharded sampler and sample-only mode.

`--mode=sample` restores only the EMA parameters from an Orbax checkpoint and
writes `workdir/samples/<name>.npz` (`arr_0`: uint8 [N, H, W, C], the layout
common FID suites read) and `<name>.png` (a grid).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, metrics, models, parallel, samplers, schedules
from diffusion_jax.schedules import Schedule


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def make_sample_fn(model, schedule: Schedule, config: ml_collections.ConfigDict,
                   batch_size: int, mesh) -> Callable:
  """A jitted fn(params, rng, eta) -> images [batch_size, H, W, C] in [-1, 1].

  The batch is split over the mesh's data axis; `eta` is a runtime value, so
  changing it never recompiles. One compile per (batch size, sampler choice).
  """
  parallel.check_batch_size(batch_size, mesh, "sample batch size")
  s = config.sample
  num_steps = None if s.num_steps == 0 else s.num_steps
  shape = (batch_size,) + image_shape(config)
  data = parallel.data_sharded(mesh)

  def fn(params, rng, eta):
    def denoise_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, data)  # keep the batch split
      return model.apply({"params": params}, x, t, None, train=False)
    return samplers.sample(denoise_fn, schedule, shape, rng, method=s.method,
                           num_steps=num_steps, eta=eta,
                           prediction=config.diffusion.prediction,
                           variance=s.variance, clip_denoised=s.clip_denoised)

  return jax.jit(fn, out_shardings=data)


def abstract_params(model, config: ml_collections.ConfigDict, mesh):
  """Parameter shapes (jax.ShapeDtypeStruct, replicated) without allocating."""
  x = jnp.zeros((1,) + image_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, t, None, train=False))["params"]
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)


def generate(sample_fn: Callable, params, num_samples: int, batch_size: int,
             seed: int, eta: float = 0.0, log_every_seconds: float = 10.0) -> np.ndarray:
  """Runs sample_fn in batches: uint8 [num_samples, H, W, C] on every host."""
  out, start, last = [], time.perf_counter(), 0.0
  num_batches = -(-num_samples // batch_size)
  for i in range(num_batches):
    rng = jax.random.fold_in(jax.random.key(seed), i)
    images = sample_fn(params, rng, jnp.float32(eta))
    out.append(metrics.to_uint8(parallel.to_host(images)))
    elapsed = time.perf_counter() - start
    if elapsed - last >= log_every_seconds or i == num_batches - 1:
      last = elapsed
      done = min((i + 1) * batch_size, num_samples)
      logging.info("sampled %d/%d images, %.1f images/s, ETA %.0fs", done, num_samples,
                   done / elapsed, (num_samples - done) * elapsed / done)
  return np.concatenate(out)[:num_samples]


def sample_name(config: ml_collections.ConfigDict, step: int) -> str:
  s = config.sample
  if s.name:
    return s.name
  steps = s.num_steps or config.diffusion.num_timesteps
  return f"{s.method}{steps}_step{step}_seed{s.seed}_n{s.num_samples}"


def save_samples(directory: str, name: str, images: np.ndarray) -> str:
  """Writes <name>.npz (arr_0 uint8 NHWC) and <name>.png; returns the npz path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name + ".npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, arr_0=images)
  os.replace(tmp, path)  # never leave a half-written result under the real name
  upscale = max(1, 64 // images.shape[1])
  metrics.save_image_grid(os.path.join(directory, name + ".png"), images[:256],
                          upscale=upscale)
  return path


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Sample-only mode: latest (or configured) EMA params -> samples on disk."""
  checkpointing.check_compatible(workdir, config)
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  params, step = ckpt.restore_ema_params(abstract_params(model, config, mesh),
                                         config.sample.checkpoint_step)
  ckpt.close()
  logging.info("Restored EMA parameters of step %d from %s", step, ckpt.directory)
  sample_fn = make_sample_fn(model, make_schedule(config), config,
                             config.sample.batch_size, mesh)
  images = generate(sample_fn, params, config.sample.num_samples,
                    config.sample.batch_size, config.sample.seed, config.sample.eta)
  path = None
  if jax.process_index() == 0:
    path = save_samples(os.path.join(workdir, "samples"), sample_name(config, step), images)
    logging.info("Wrote %d samples to %s", len(images), path)
  return path
