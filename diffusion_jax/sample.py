"""Sample-only mode: a checkpoint's EMA parameters -> samples on disk.

`--mode=sample` restores only the EMA parameters from an Orbax checkpoint and
writes `workdir/samples/<name>.npz` (`arr_0`: uint8 [N, H, W, C], the layout
common FID suites read) and `<name>.png` (a grid).

What the model is conditioned on comes from the config (conditioning/): a
class-conditional model generates the classes `sample.labels` names ("" or
"all": every class equally; "7"; "1,3,5"), a text-conditioned one the
captions of `sample.captions`, both with classifier-free guidance at
`sample.guidance_scale`; the .npz then also holds `labels` int32 [N] or
`captions`, and the grid shows one class per row or each caption. A
super-resolution stage is sampled in a cascade (cascade.py).

The sampler itself, shared by every mode, is generation.py.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
from absl import logging

from diffusion_jax import builders, checkpointing, config_lib, generation
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.sample_io import save_samples


_UNCLIP_PART = {"clip": "a CLIP (model.name='clip')",
                "prior": "an unCLIP prior (model.name='prior')"}


def sample_name(config: ml_collections.ConfigDict, step: int) -> str:
  """The file stem of a sample run: sampler, steps, checkpoint step, seed, n, scale."""
  s = config.sample
  if s.name:
    return s.name
  steps = s.num_steps or config.diffusion.num_timesteps
  name = f"{s.method}{steps}_step{step}_seed{s.seed}_n{s.num_samples}"
  name += generation.convention_suffix(s)
  if s.guidance_scale != 1.0:
    name += f"_cfg{s.guidance_scale:g}"
  return name


def trained_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config a workdir's checkpoints were trained with, if it was saved."""
  if os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    return checkpointing.load_config(workdir)
  return None


def check_request(config: ml_collections.ConfigDict, workdir: str,
                  conditioning: Conditioning) -> None:
  """Sampler settings, and a guidance scale the checkpoint's model can honour."""
  config_lib.validate_sample(config)
  checkpointing.check_compatible(workdir, config)
  conditioning.check_guidance(config.sample.guidance_scale, trained_config(workdir))


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """Sample-only mode: latest (or configured) EMA params -> samples on disk."""
  if config.model.name in ("clip", "prior"):
    raise ValueError(f"{workdir} holds {_UNCLIP_PART[config.model.name]}, which draws no "
                     "images by itself: sample it in the unCLIP pipeline, --config="
                     "configs/unclip.py:PRIOR_DIR,DECODER_DIR (--mode=eval on a CLIP scores "
                     "its caption retrieval).")
  conditioning = Conditioning(config)
  check_request(config, workdir, conditioning)
  s = config.sample
  request = conditioning.request(s.num_samples)  # before the restore: fails fast
  model, params, step, mesh = builders.restore_ema(config, workdir, s.checkpoint_step)
  logging.info("Restored EMA parameters of step %d from %s", step, workdir)
  sample_fn = generation.make_sample_fn(model, builders.make_schedule(config), config,
                                        s.batch_size, mesh, conditioning=conditioning)
  images = generation.generate(sample_fn, params, s.num_samples, s.batch_size, s.seed, s.eta,
                               cond=request.cond)
  path = None
  if jax.process_index() == 0:
    path = save_samples(os.path.join(workdir, "samples"), sample_name(config, step), images,
                        request.labels, request.captions)
    logging.info("Wrote %d samples to %s", len(images), path)
  return path
