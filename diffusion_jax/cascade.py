"""Cascaded sampling: a base model, then each super-resolution stage in turn.

A cascade config (configs/cascade.py) holds `cascade` (what to draw) and one
complete run config per stage, `stage_0` (the base) to `stage_{n-1}`, each
loaded from that stage's training workdir, so every sampler setting of a
stage can be overridden (`--config.stage_1.sample.num_steps=20`,
`--config.stage_1.superres.sample_aug_level=0.1`).

Stage i > 0 is a super-resolution model whose `data.low_res_size` is stage
i-1's `data.image_size`; it samples conditioned on stage i-1's output (as
uint8, exactly what was written to disk), noise-augmented at its own
`superres.sample_aug_level`. Labels (`cascade.labels`) and captions
(`cascade.captions`, or the base's own `sample.labels` / `sample.captions`)
go to every stage that takes them.

Writes, under `<workdir>/samples/`: `<name>_stage<i>_<size>.npz` for each
stage (arr_0 uint8 [N, S, S, C], plus `labels`) and `<name>.png`, one row
per sample with every stage side by side at the final size.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import builders, config_lib, generation, run_logging, sample
from diffusion_jax.conditioning import Conditioning, Request
from diffusion_jax.sample_io import save_samples


def stages(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The stage configs `stage_0`, ..., in order (as many as cascade.workdirs)."""
  n = len(config.cascade.workdirs)
  missing = [f"stage_{i}" for i in range(n) if f"stage_{i}" not in config]
  if missing:
    raise ValueError(f"The cascade names {n} workdirs but the config lacks {missing}; build "
                     "it with configs/cascade.py:DIR0,DIR1,...")
  return [config[f"stage_{i}"] for i in range(n)]


def check_chain(stage_configs: list[ml_collections.ConfigDict]) -> None:
  """Raises ValueError unless the stages chain: sizes, channels, conditioning."""
  if len(stage_configs) < 2:
    raise ValueError(f"A cascade needs a base and at least one super-resolution stage; got "
                     f"{len(stage_configs)} stage(s).")
  if Conditioning(stage_configs[0]).upsamples:
    raise ValueError("stage_0 is a super-resolution model (model.low_res_channels > 0); the "
                     "first stage must be a base model.")
  base_inputs = set(Conditioning(stage_configs[0]).inputs)
  for i in range(1, len(stage_configs)):
    prev, cur = stage_configs[i - 1].data, stage_configs[i]
    conditioning = Conditioning(cur)
    if not conditioning.upsamples:
      raise ValueError(f"stage_{i} is not a super-resolution model (model.low_res_channels "
                       "= 0); every stage after the first must be one.")
    last = stage_configs[-1].data.image_size
    if cur.data.image_size and last % cur.data.image_size:
      raise ValueError(f"stage_{i} makes {cur.data.image_size}x{cur.data.image_size} images, "
                       f"which do not divide the final size {last}.")
    if cur.data.low_res_size != prev.image_size or cur.data.channels != prev.channels:
      raise ValueError(
          f"The stages do not chain: stage_{i - 1} makes {prev.image_size}x{prev.image_size}x"
          f"{prev.channels} images, but stage_{i} upsamples {cur.data.low_res_size}x"
          f"{cur.data.low_res_size}x{cur.data.channels} (data.low_res_size, data.channels).")
    unmatched = [name for name in conditioning.shared_inputs if name not in base_inputs]
    if unmatched:
      raise ValueError(f"stage_{i} is conditioned on {conditioning.describe()}, but the base "
                       f"(stage_0) takes no {', '.join(unmatched)}, so they would not match "
                       "the base samples.")
  for s in stage_configs:
    config_lib.validate(s)


def _with_cascade_request(config: ml_collections.ConfigDict,
                          stage_configs: list[ml_collections.ConfigDict]) -> None:
  """cascade.labels / cascade.captions, when set, become the base's sample request
  (every later stage takes the base's labels and captions)."""
  base = stage_configs[0].sample
  for name in ("labels", "captions"):
    spec = config.cascade[name]
    if str(spec).strip():
      base[name] = spec


def sample_stage(stage_config, workdir: str, given: dict, num_samples: int,
                 batch_size: int, seed: int):
  """(uint8 [N, S, S, C], its Request) from one stage's latest (or configured) EMA
  parameters; `given`: the base's labels and captions, the previous stage's images."""
  conditioning = Conditioning(stage_config)
  sample.check_request(stage_config, workdir, conditioning)
  request = conditioning.request(
      num_samples, **{k: v for k, v in given.items() if k in conditioning.inputs})
  model, params, step, mesh = builders.restore_ema(stage_config, workdir,
                                                   stage_config.sample.checkpoint_step)
  logging.info("Stage %s: EMA parameters of step %d", workdir, step)
  fn = generation.make_sample_fn(model, builders.make_schedule(stage_config), stage_config,
                                 batch_size, mesh, conditioning=conditioning)
  images = generation.generate(fn, params, num_samples, batch_size, seed,
                               stage_config.sample.eta, cond=request.cond)
  return images, request


def side_by_side(outputs: list[np.ndarray], max_rows: int = 16) -> np.ndarray:
  """[rows * n_stages, S, S, C] uint8: each stage's sample upscaled (nearest) to the
  final size S, stages of one sample next to each other."""
  size = outputs[-1].shape[1]
  rows = min(max_rows, len(outputs[-1]))
  tiles = []
  for r in range(rows):
    for out in outputs:
      k = size // out.shape[1]
      tiles.append(np.repeat(np.repeat(out[r], k, axis=0), k, axis=1))
  return np.stack(tiles)


def run_cascade(config: ml_collections.ConfigDict, base_given: Optional[dict] = None
                ) -> tuple[list[np.ndarray], Request]:
  """Samples every stage in turn: (uint8 outputs of each stage, the base's Request).

  Args:
    config: the cascade config.
    base_given: request inputs of the base (labels, captions), e.g. eval mode's;
      default: what cascade.labels / cascade.captions or the base's config name.
  """
  c = config.cascade
  if c.num_samples <= 0 or c.batch_size <= 0:
    raise ValueError(f"cascade.num_samples and cascade.batch_size must be > 0, got "
                     f"{c.num_samples} and {c.batch_size}.")
  stage_configs = stages(config)
  _with_cascade_request(config, stage_configs)
  check_chain(stage_configs)
  return run_stages(stage_configs, c.workdirs, dict(base_given or {}), c.num_samples,
                    c.batch_size, c.seed)


def run_stages(stage_configs: list[ml_collections.ConfigDict], workdirs, base_given: dict,
               num_samples: int, batch_size: int, seed: int
               ) -> tuple[list[np.ndarray], Request]:
  """Stage 0 on `base_given`, then each upsampler on the previous stage's output.

  Returns (uint8 outputs of each stage, the base's Request); stage i uses seed + i.
  """
  outputs, given, base_request = [], base_given, None
  for i, (stage_config, stage_dir) in enumerate(zip(stage_configs, workdirs)):
    if i > 0:  # the previous stage's images, exactly as written to disk
      upsampled = Conditioning(stage_config).upsampled_input
      given[upsampled] = outputs[-1].astype(np.float32) / 127.5 - 1.0
    images, request = sample_stage(stage_config, stage_dir, given, num_samples, batch_size,
                                   seed + i)
    outputs.append(images)
    if i == 0:  # every later stage takes the base's labels and captions
      base_request = request
      given = {"labels": request.labels, "captions": request.captions}
  return outputs, base_request


def sample_cascade(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Samples every stage in turn; returns the .npz paths (process 0; else [])."""
  c = config.cascade
  outputs, request = run_cascade(config)
  labels, captions = request.labels, request.captions
  if jax.process_index() != 0:
    return []
  out_dir = os.path.join(workdir, "samples")
  paths = []
  for i, images in enumerate(outputs):
    name = f"{c.name}_stage{i}_{images.shape[1]}"
    paths.append(save_samples(out_dir, name, images, labels, captions))
  run_logging.save_image_grid(os.path.join(out_dir, c.name + ".png"), side_by_side(outputs),
                          nrow=len(outputs), upscale=max(1, 64 // outputs[-1].shape[1]))
  logging.info("Wrote %d cascade samples per stage to %s", c.num_samples, out_dir)
  return paths
