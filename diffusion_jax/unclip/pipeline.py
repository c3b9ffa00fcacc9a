"""unCLIP sampling: captions -> prior -> CLIP image embeddings -> decoder (-> upsamplers).

An unCLIP config (configs/unclip.py:PRIOR_DIR,DECODER_DIR[,SR_DIR...]) holds
`unclip` (what to draw), `prior` and `stage_0` (the decoder), `stage_1`, ...
(upsamplers), each the config saved by that model's training run, so every
sampler setting can be overridden (`--config.prior.sample.guidance_scale=2`).

`unclip.mode`:
  "captions"       the captions of `unclip.captions` (as sample.captions):
                   the prior draws one image embedding per sample
                   (`unclip.prior="diffusion"`), or the caption's CLIP text
                   embedding is used in its place (`"none"`, the paper's
                   baseline); the decoder draws from it.
  "variations"     each image of `unclip.source` (an .npz, arr_0 uint8) is
                   embedded by the decoder's CLIP and decoded
                   `unclip.num_variations` times with fresh noise.
  "interpolations" the first `unclip.num_pairs` pairs of images of
                   `unclip.source`: their embeddings are slerped at
                   `unclip.interpolation_steps` points and decoded with the same
                   noise at every point (DALL-E 2, section 3.1).

Writes `<workdir>/samples/<name>_stage<i>_<size>.npz` (arr_0 uint8, plus
`captions` and `image_embeds` float32 [N, D]) and `<name>.png`.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import builders, cascade, config_lib, generation, run_logging, sample
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.conditioning.clip_text import check_prior_fits
from diffusion_jax.config_checks import one_of
from diffusion_jax.sample_io import save_samples
from diffusion_jax.unclip.clip_encoder import FrozenCLIP

MODES = ("captions", "variations", "interpolations")
PRIORS = ("diffusion", "none")


def stage_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  n = len(config.unclip.stage_workdirs)
  return [config[f"stage_{i}"] for i in range(n)]


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an unCLIP config whose models do not fit together."""
  u = config.unclip
  one_of("unclip.mode", u.mode, MODES)
  one_of("unclip.prior", u.prior, PRIORS)
  if u.num_samples <= 0 or u.batch_size <= 0:
    raise ValueError(f"unclip.num_samples and unclip.batch_size must be > 0, got "
                     f"{u.num_samples} and {u.batch_size}.")
  stages = stage_configs(config)
  decoder = stages[0]
  if not decoder.model.image_embed_dim:
    raise ValueError(f"stage_0 ({u.stage_workdirs[0]}) is not an unCLIP decoder "
                     "(model.image_embed_dim = 0).")
  prior = config.prior
  if prior.model.name != "prior":
    raise ValueError(f"unclip.prior_workdir ({u.prior_workdir}) holds a model.name="
                     f"{prior.model.name!r} run, not the unCLIP prior.")
  clip = FrozenCLIP.from_config(decoder)
  clip.check_embed_dim(decoder.model.image_embed_dim, "the decoder's model.image_embed_dim")
  prior_clip = FrozenCLIP.from_config(prior)
  if prior_clip is not clip:
    raise ValueError(f"The prior was trained on the embeddings of {prior_clip.source}, the "
                     f"decoder on those of {clip.source}: they must share one CLIP (the "
                     "prior's samples would be another CLIP's embeddings).")
  check_prior_fits(prior.model.prior, clip)
  if len(stages) > 1:
    cascade.check_chain(stages)
  for s in [prior] + stages:
    config_lib.validate(s)


def prior_embeddings(config: ml_collections.ConfigDict, captions: list[str]) -> np.ndarray:
  """float32 [N, D]: one image embedding per caption (norm sqrt(D)), from the prior
  or, with unclip.prior="none", the captions' own CLIP text embeddings."""
  u, prior = config.unclip, config.prior
  conditioning = Conditioning(prior)
  request = conditioning.request(len(captions), captions=captions)
  if u.prior == "none":
    return request.cond["text_embed"]
  sample.check_request(prior, u.prior_workdir, conditioning)
  model, params, step, mesh = builders.restore_ema(prior, u.prior_workdir,
                                                   prior.sample.checkpoint_step)
  logging.info("Prior %s: EMA parameters of step %d", u.prior_workdir, step)
  fn = generation.make_sample_fn(model, builders.make_schedule(prior), prior, u.batch_size,
                                 mesh, conditioning=conditioning)
  emb = generation.generate(fn, params, len(captions), u.batch_size, u.seed + 100,
                            prior.sample.eta, cond=request.cond, as_images=False)
  # The decoder was trained on unit CLIP embeddings scaled by sqrt(D).
  norm = np.linalg.norm(emb, axis=-1, keepdims=True)
  return (emb / np.maximum(norm, 1e-12) * np.sqrt(emb.shape[-1])).astype(np.float32)


def decode(config: ml_collections.ConfigDict, image_embeds: np.ndarray,
           captions: Optional[list[str]] = None, seed: Optional[int] = None
           ) -> list[np.ndarray]:
  """uint8 outputs of the decoder and each upsampler, for embeddings [N, D]."""
  u, stages = config.unclip, stage_configs(config)
  given = {"image_embeds": image_embeds}
  if captions is not None and "captions" in Conditioning(stages[0]).inputs:
    given["captions"] = captions
  outputs, _ = cascade.run_stages(stages, u.stage_workdirs, given, len(image_embeds),
                                  u.batch_size, u.seed if seed is None else seed)
  return outputs


def slerp(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Spherical interpolation between rows a, b [P, D] at weights [K] -> [K, P, D].

  The norm is interpolated linearly (both are sqrt(D) here, so it stays).
  """
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  na, nb = np.linalg.norm(a64, axis=-1), np.linalg.norm(b64, axis=-1)
  cos = np.clip(np.sum(a64 * b64, -1) / (na * nb), -1.0, 1.0)
  omega = np.arccos(cos)[None, :, None]
  w = np.asarray(weights, np.float64)[:, None, None]
  ua, ub = (a64 / na[:, None])[None], (b64 / nb[:, None])[None]
  sin = np.sin(omega)
  small = sin < 1e-6  # (nearly) the same direction: linear is the limit
  ca = np.where(small, 1.0 - w, np.sin((1.0 - w) * omega) / np.where(small, 1.0, sin))
  cb = np.where(small, w, np.sin(w * omega) / np.where(small, 1.0, sin))
  direction = ca * ua + cb * ub
  norm = (1.0 - w) * na[None, :, None] + w * nb[None, :, None]
  return (direction / np.linalg.norm(direction, axis=-1, keepdims=True) * norm
          ).astype(np.float32)


def source_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """float32 [N, H, W, C] in [-1, 1]: `unclip.source`, checked against the decoder."""
  path, d = config.unclip.source, config.stage_0.data
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"unclip.mode={config.unclip.mode!r} needs unclip.source, an .npz "
                            f"of images (arr_0 uint8 [N, H, W, C]); got {path!r}.")
  with np.load(path) as f:
    images = f["arr_0"]
  want = (d.image_size, d.image_size, d.channels)
  if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
    raise ValueError(f"unclip.source {path!r} holds {images.dtype} images of shape "
                     f"{images.shape[1:]}, but the decoder draws {want} uint8 images; "
                     "resize them to the decoder's data.image_size first.")
  return images.astype(np.float32) / 127.5 - 1.0


def _captions_run(config):
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.conditioning.text import sample_captions
  captions = sample_captions(config.unclip.captions, config.unclip.num_samples)
  embeds = prior_embeddings(config, captions)
  return decode(config, embeds, captions), captions, embeds


def _variations_run(config):
  u = config.unclip
  images = source_images(config)[:u.num_samples]
  clip = FrozenCLIP.from_config(config.stage_0)
  embeds = np.repeat(clip.image_embeddings(images), u.num_variations, axis=0)
  outputs = decode(config, embeds)
  source = run_logging.to_uint8(images)
  return outputs, source, embeds


def _interpolations_run(config):
  u = config.unclip
  images = source_images(config)
  if len(images) < 2 * u.num_pairs:
    raise ValueError(f"unclip.num_pairs={u.num_pairs} needs {2 * u.num_pairs} images in "
                     f"unclip.source; it holds {len(images)}.")
  clip = FrozenCLIP.from_config(config.stage_0)
  emb = clip.image_embeddings(images[:2 * u.num_pairs])
  points = slerp(emb[0::2], emb[1::2], np.linspace(0.0, 1.0, u.interpolation_steps))
  # The same seed at every point: each pair keeps its decoder noise along the path.
  per_point = [decode(config, p, seed=u.seed) for p in points]
  outputs = [np.stack([o[s] for o in per_point], axis=1).reshape(
      (-1,) + per_point[0][s].shape[1:]) for s in range(len(per_point[0]))]
  return outputs, points.transpose(1, 0, 2).reshape(-1, points.shape[-1])


def sample_unclip(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Runs `unclip.mode`; writes each stage's .npz and a grid (process 0)."""
  check(config)
  u = config.unclip
  captions, rows = None, None
  if u.mode == "captions":
    outputs, captions, embeds = _captions_run(config)
  elif u.mode == "variations":
    outputs, source, embeds = _variations_run(config)
    rows = u.num_variations
  else:
    outputs, embeds = _interpolations_run(config)
    rows = u.interpolation_steps
  if jax.process_index() != 0:
    return []
  out_dir = os.path.join(workdir, "samples")
  paths = []
  for i, images in enumerate(outputs):
    paths.append(save_samples(out_dir, f"{u.name}_stage{i}_{images.shape[1]}", images,
                              captions=captions, extra={"image_embeds": embeds}))
  final = outputs[-1]
  if u.mode == "variations":  # each row: the source image, then its variations
    k = final.shape[1] // source.shape[1]
    up = np.repeat(np.repeat(source[:len(final) // rows], k, 1), k, 2)
    final = np.concatenate([up[:, None], final.reshape((-1, rows) + final.shape[1:])],
                           axis=1).reshape((-1,) + final.shape[1:])
    rows += 1
  run_logging.save_image_grid(os.path.join(out_dir, u.name + ".png"), final,
                              nrow=rows or 8, upscale=max(1, 64 // final.shape[1]))
  logging.info("Wrote %d unCLIP samples (%s) to %s", len(outputs[-1]), u.mode, out_dir)
  return paths
