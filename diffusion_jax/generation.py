"""The sharded sampler of a trained model, for every mode that draws images.

Training grids, sample mode, eval mode, cascades and benchmarks all draw with

    sample_fn = make_sample_fn(model, schedule, config, batch_size, mesh)
    request = conditioning.Conditioning(config).request(n, labels=..., captions=...)
    images = generate(sample_fn, params, n, batch_size, seed, cond=request.cond)

`cond` is the model's conditioning as one dict of [N, ...] arrays
(conditioning/); `generate` slices every leaf per batch with one tree map.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import builders, guidance, parallel, run_logging, samplers
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.schedules import Schedule


def make_sample_fn(model, schedule: Schedule, config: ml_collections.ConfigDict,
                   batch_size: int, mesh, guided: Optional[bool] = None,
                   conditioning: Optional[Conditioning] = None) -> Callable:
  """A sampler fn(params, rng, cond=None, guidance_scale=None, eta=None).

  It returns images [batch_size, H, W, C] in [-1, 1], the batch split over the
  mesh's data axis. `cond` is a dict of [batch_size, ...] arrays (a
  `Conditioning.request`'s, sliced to the batch), None for an unconditional
  model. `guidance_scale` is a scalar or a per-sample [batch_size] array
  (default `config.sample.guidance_scale`); `eta` the DDIM noise scale
  (default `config.sample.eta`). Both are runtime values, so changing them never
  recompiles; one compile per (batch size, sampler choice).

  Args:
    model: the Flax module.
    schedule: the diffusion schedule.
    config: the run config (sample and diffusion sections).
    batch_size: global samples per call; must divide over the mesh.
    mesh: the device mesh.
    guided: build the classifier-free-guided sampler (two passes of the
      network per step, batched). Default: when the config asks for a
      guidance scale other than 1 (a conditional sampler at scale 1 needs
      only one pass). A guidance-distilled model (model.guidance_embed) is
      never guided so: it takes the scale as an input, in one pass.
    conditioning: the config's Conditioning, to share a loaded text encoder.

  Returns:
    The sampler; its `guided` attribute says which kind it is, `batch_size`
    the batch it draws, and `jitted` the underlying jitted function.
  """
  parallel.check_batch_size(batch_size, mesh, "sample batch size")
  s = config.sample
  conditioning = conditioning or Conditioning(config)
  takes_scale = conditioning.takes_guidance_scale
  if guided is None:
    guided = conditioning.guidable and s.guidance_scale != 1.0 and not takes_scale
  if guided and takes_scale:
    raise ValueError("This model takes the guidance scale as an input (model.guidance_embed):"
                     " it samples guided in one pass; build its sampler with guided=False.")
  if guided and not conditioning.guidable:
    raise ValueError(f"Guidance needs a class- or text-conditional model; this one is "
                     f"conditioned on {conditioning.describe()}.")
  shape = (batch_size,) + builders.sample_shape(config)
  data = parallel.data_sharded(mesh)
  kwargs = dict(method=s.method, num_steps=s.num_steps or None,
                prediction=config.diffusion.prediction, variance=s.variance,
                thresholding=s.thresholding,
                dynamic_threshold_percentile=s.dynamic_threshold_percentile,
                timestep_spacing=s.timestep_spacing, ddim_eps=s.ddim_eps)

  def fn(params, rng, cond, scale, eta):
    def model_fn(x, t, c):
      x = jax.lax.with_sharding_constraint(x, data)  # keep the batch split
      return model.apply({"params": params}, x, t, c, train=False)
    cond = conditioning.for_sampling(cond, rng, schedule)  # once per batch
    if takes_scale:  # a guidance-distilled student: the scale is an input
      cond = {**cond, "guidance": scale}
    if scale is None or takes_scale:
      denoise_fn = lambda x, t: model_fn(x, t, cond)
    else:
      denoise_fn = guidance.guided_cond_denoiser(model_fn, cond, conditioning.null(cond),
                                                 scale)
    return samplers.sample(denoise_fn, schedule, shape, rng, eta=eta, **kwargs)

  jitted = jax.jit(fn, out_shardings=data)

  def sample_fn(params, rng, cond=None, guidance_scale=None, eta=None):
    cond = conditioning.check(cond, batch_size)
    if guidance_scale is None:
      guidance_scale = s.guidance_scale
    scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (batch_size,))
    if takes_scale:
      conditioning.check_guidance(scale)
    elif not guided and np.any(scale != 1.0):
      conditioning.check_guidance(guidance_scale)  # says why, for a model without it
      raise ValueError("This sampler was built without guidance (guided=False); build it "
                       "with guided=True to use a guidance scale other than 1.")
    eta = s.eta if eta is None else eta
    return jitted(params, rng, cond, scale if guided or takes_scale else None,
                  jnp.float32(eta))

  sample_fn.guided, sample_fn.jitted, sample_fn.batch_size = guided, jitted, batch_size
  return sample_fn


def convention_suffix(s: ml_collections.ConfigDict) -> str:
  """A file-name suffix for non-default sampler conventions, e.g. "_leading_raweps"
  ("" for the defaults), so sample and eval files of different conventions do not
  overwrite each other."""
  suffix = "" if s.timestep_spacing == "uniform" else f"_{s.timestep_spacing}"
  return suffix + ("_raweps" if s.method == "ddim" and s.ddim_eps == "raw" else "")


def _batch_slice(values, i: int, batch_size: int, num_samples: int):
  """Batch i of per-sample values [num_samples], the last padded by repetition."""
  if values is None or np.ndim(values) == 0:
    return values
  idx = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), num_samples - 1)
  return np.asarray(values)[idx]


def generate(sample_fn: Callable, params, num_samples: int, batch_size: int,
             seed: int, eta: Optional[float] = None, log_every_seconds: float = 10.0, *,
             cond: Optional[dict] = None, guidance_scale=None,
             as_images: bool = True) -> np.ndarray:
  """Runs sample_fn in batches: uint8 [num_samples, H, W, C] on every host.

  Args:
    sample_fn: from `make_sample_fn`.
    params: the (EMA) parameters.
    num_samples: images to draw.
    batch_size: the sampler's batch size.
    seed: batch i uses fold_in(key(seed), i).
    eta: DDIM noise scale; None means the config's.
    log_every_seconds: progress log interval.
    cond: the conditioning of every sample, a dict of [num_samples, ...]
      arrays (`Conditioning.request(...).cond`); None if unconditional.
    guidance_scale: a scalar or a per-sample [num_samples] array; None means
      the config's.
    as_images: False returns the samples as float32 (the unCLIP prior's CLIP
      embeddings [num_samples, D]) instead of uint8 images.
  """
  _check_generate_args(sample_fn, num_samples, batch_size, cond, guidance_scale)
  out, start, last = [], time.perf_counter(), 0.0
  num_batches = -(-num_samples // batch_size)
  for i in range(num_batches):
    rng = jax.random.fold_in(jax.random.key(seed), i)
    take = lambda v, i=i: _batch_slice(v, i, batch_size, num_samples)
    images = sample_fn(params, rng, jax.tree.map(take, cond), take(guidance_scale), eta)
    host = parallel.to_host(images)
    out.append(run_logging.to_uint8(host) if as_images else np.asarray(host, np.float32))
    elapsed = time.perf_counter() - start
    if elapsed - last >= log_every_seconds or i == num_batches - 1:
      last = elapsed
      done = min((i + 1) * batch_size, num_samples)
      logging.info("sampled %d/%d images, %.1f images/s, ETA %.0fs", done, num_samples,
                   done / elapsed, (num_samples - done) * elapsed / done)
  return np.concatenate(out)[:num_samples]


def _check_generate_args(sample_fn: Callable, num_samples: int, batch_size: int,
                         cond: Optional[dict], guidance_scale) -> None:
  """generate()'s counts, and one entry per sample in every per-sample input."""
  if num_samples <= 0 or batch_size <= 0:
    raise ValueError(f"num_samples and batch_size must be > 0, got {num_samples} and "
                     f"{batch_size}.")
  built = getattr(sample_fn, "batch_size", batch_size)
  if built != batch_size:
    raise ValueError(f"batch_size={batch_size}, but the sampler was built for batches of "
                     f"{built} (make_sample_fn's batch_size); pass the same number.")
  per_sample = {f"cond[{k!r}]": v for k, v in (cond or {}).items()}
  if np.ndim(guidance_scale) > 0:
    per_sample["guidance_scale"] = guidance_scale
  for name, values in per_sample.items():
    if len(values) != num_samples:
      raise ValueError(f"{name} has {len(values)} entries for {num_samples} samples.")
