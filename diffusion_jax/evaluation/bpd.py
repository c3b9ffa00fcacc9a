"""Bits per dim of a trained model on the eval split (eval mode's "bpd").

The DDPM variational bound (likelihood.py) of each eval example, conditioned on
that example's own conditioning: its label, its caption, or (a
super-resolution stage) its low-resolution image, noise-augmented at the
sampling level `superres.sample_aug_level` as samples are.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import builders, input_pipeline, likelihood, parallel
from diffusion_jax.conditioning import Conditioning

# Folded into a batch's key for the conditioning's own draws (low-res augmentation).
_COND = 1 << 21


def _tile(cond, rows: int):
  """cond entries [B, ...] repeated to [rows, ...]: likelihood.vb_terms evaluates
  timesteps in chunks, calling the network on [chunk x B] stacked chunk-major."""
  return jax.tree.map(lambda a: jnp.tile(a, (rows // a.shape[0],) + (1,) * (a.ndim - 1)),
                      cond)


def _bpd_fn(model, config: ml_collections.ConfigDict, mesh,
            conditioning: Conditioning) -> Callable:
  """jit fn(params, x0 [B, H, W, C] in [-1, 1], cond, rng) -> bits/dim [B], sharded."""
  schedule = builders.make_schedule(config)
  data = parallel.data_sharded(mesh)

  def fn(params, x0, cond, rng):
    cond = conditioning.for_sampling(cond, jax.random.fold_in(rng, _COND), schedule)

    def denoise_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, data)
      c = None if cond is None else _tile(cond, x.shape[0])
      return model.apply({"params": params}, x, t, c, train=False)
    return likelihood.bits_per_dim(denoise_fn, schedule, x0, rng,
                                   prediction=config.diffusion.prediction,
                                   variance=config.sample.variance, clip_denoised=False)
  return jax.jit(fn, out_shardings=data)


def bits_per_dim_on_split(model, params, config: ml_collections.ConfigDict, mesh,
                          conditioning: Conditioning) -> dict[str, Any]:
  """Mean bits/dim over the eval split (capped at eval.bpd_max_examples if > 0).

  Batch i uses key fold_in(key(eval.seed), i) for its one noise draw per
  timestep, so the figure is reproducible.

  Returns:
    {"bits_per_dim": mean, "std": std over examples, "num_examples": n,
     "split": ..., "conditioned_on": ..., ...settings}.
  """
  ev = config.eval
  parallel.check_batch_size(ev.bpd_batch_size, mesh, "eval.bpd_batch_size")
  fn = _bpd_fn(model, config, mesh, conditioning)
  values, start = [], time.perf_counter()
  it = input_pipeline.create_eval_iterator(config.data, ev.bpd_batch_size)
  for i, batch in enumerate(it):
    n = len(batch["image"])
    cond = conditioning.request(n, **conditioning.batch_inputs(batch)).cond
    arrays = parallel.to_global({"image": batch["image"], "mask": batch["mask"],
                                 "cond": cond}, mesh)
    bpd = fn(params, arrays["image"], arrays["cond"],
             jax.random.fold_in(jax.random.key(ev.seed), i))
    values.append(parallel.to_host(bpd)[parallel.to_host(arrays["mask"])])
    done = sum(len(v) for v in values)
    logging.info("bits/dim: %d examples, running mean %.4f (%.0f s)", done,
                 np.concatenate(values).mean(), time.perf_counter() - start)
    if ev.bpd_max_examples and done >= ev.bpd_max_examples:
      break
  values = np.concatenate(values).astype(np.float64)
  if ev.bpd_max_examples:
    values = values[:ev.bpd_max_examples]
  return {"bits_per_dim": float(values.mean()), "std": float(values.std()),
          "num_examples": int(len(values)), "split": config.data.eval_split,
          "conditioned_on": conditioning.describe(),
          "max_examples": ev.bpd_max_examples, "variance": config.sample.variance,
          "clip_denoised": False, "seed": ev.seed, "batch_size": ev.bpd_batch_size}
