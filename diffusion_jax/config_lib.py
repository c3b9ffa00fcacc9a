"""Checks a run config's values before any work starts.

Unknown keys are already rejected by ml_collections (the config is locked);
this catches bad values with a message that says how to fix them.
"""
from __future__ import annotations

import warnings

import ml_collections

from diffusion_jax import conditioning, default_config, diffusion, optim, samplers, schedules
from diffusion_jax.config_checks import one_of as _one_of
from diffusion_jax.config_checks import require as _require


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError("Bad config: ...") for the first bad value found."""
  d, df, o, t = config.data, config.diffusion, config.optim, config.training
  _one_of("data.channels", d.channels, (1, 3))
  _require(d.image_size > 0, f"data.image_size must be > 0, got {d.image_size}.")
  _one_of("diffusion.schedule", df.schedule, schedules.SCHEDULE_NAMES)
  _require(df.num_timesteps >= 2, f"diffusion.num_timesteps must be >= 2, got {df.num_timesteps}.")
  _one_of("diffusion.prediction", df.prediction, diffusion.PREDICTIONS)
  _one_of("diffusion.weighting", df.weighting, diffusion.WEIGHTINGS)
  _require(df.weighting != "min_snr" or df.min_snr_gamma > 0,
           f"diffusion.weighting='min_snr' needs diffusion.min_snr_gamma > 0, got "
           f"{df.min_snr_gamma}.")
  for name in ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps",
               "keep_checkpoints"):
    _require(t[name] > 0, f"training.{name} must be > 0, got {t[name]}.")
  _require(t.sample_every_steps >= 0, "training.sample_every_steps must be >= 0 (0 disables).")
  _require(not t.sample_every_steps or t.num_grid_samples > 0,
           f"training.num_grid_samples must be > 0 when training grids are on (training."
           f"sample_every_steps={t.sample_every_steps}), got {t.num_grid_samples}.")
  _validate_optim(o)
  validate_sample(config)  # with the conditioning, which owns its checks
  _validate_unclip_models(config)
  if config.model.name not in ("prior", "clip"):
    _validate_attention(config)
  pa = config.parallel
  _require(pa.fsdp_axis_size >= 1, f"parallel.fsdp_axis_size must be >= 1, got "
           f"{pa.fsdp_axis_size}.")
  _require(pa.data_axis_size == -1 or pa.data_axis_size >= 1,
           f"parallel.data_axis_size must be -1 (all the rest) or >= 1, got "
           f"{pa.data_axis_size}.")
  _require(pa.fsdp_min_size >= 0, f"parallel.fsdp_min_size must be >= 0, got "
           f"{pa.fsdp_min_size}.")


def over_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (a workdir's config.json, as a dict) laid over the defaults.

  A run saved by an older version lacks the fields added since; each takes its
  default, which is the behaviour that version had. Renamed fields are carried
  over: `sample.clip_denoised` (before `sample.thresholding`) becomes "static"
  or "none". Fields the defaults lack (sections of a cascade) are kept.
  """
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  sample = saved.get("sample", {})
  if "clip_denoised" in sample:
    clip = sample.pop("clip_denoised")
    sample.setdefault("thresholding", "static" if clip else "none")

  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
      both = isinstance(value, dict) and isinstance(base.get(key), dict)
      out[key] = merge(base[key], value) if both else value
    return out
  return ml_collections.ConfigDict(merge(default_config.get_config().to_dict(), saved))


def _validate_optim(o: ml_collections.ConfigDict) -> None:
  """The optimiser: known names, a positive rate, Adam's betas below 1."""
  _one_of("optim.optimizer", o.optimizer, optim.OPTIMIZERS)
  _one_of("optim.lr_schedule", o.lr_schedule, optim.LR_SCHEDULES)
  _require(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay must be in [0, 1), got {o.ema_decay}.")
  _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}.")
  _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
  _require(o.grad_clip_norm >= 0, f"optim.grad_clip_norm must be >= 0 (0 disables), got "
           f"{o.grad_clip_norm}.")
  for name in ("b1", "b2"):
    _require(0.0 <= o[name] < 1.0, f"optim.{name} must be in [0, 1) (Adam's bias correction "
             f"divides by 1 - {name}^t), got {o[name]}.")
  _require(o.eps > 0 and o.weight_decay >= 0, f"optim.eps must be > 0 and optim.weight_decay "
           f">= 0, got {o.eps} and {o.weight_decay}.")


def _validate_unclip_models(config: ml_collections.ConfigDict) -> None:
  """A CLIP or the unCLIP prior: what the image-model machinery must not do to them."""
  m, t, d = config.model, config.training, config.data
  if m.name not in ("prior", "clip"):
    return
  _require(not t.sample_every_steps, f"model.name={m.name!r} makes no images: set "
           f"training.sample_every_steps=0 (training grids are image grids), got "
           f"{t.sample_every_steps}.")
  if m.name == "prior":
    _require(config.sample.thresholding == "none", "The unCLIP prior samples CLIP "
             "embeddings (norm sqrt(D)), not images in [-1, 1]: set "
             f"sample.thresholding='none', got {config.sample.thresholding!r}.")
    return
  _require(config.conditioning.type == "none" and not m.image_embed_dim,
           "A CLIP (model.name='clip') is trained on (image, caption) pairs without "
           "diffusion conditioning: set conditioning.type='none' and model.image_embed_dim=0.")
  _require(bool(d.caption_key), "A CLIP (model.name='clip') learns from captions: set "
           "data.caption_key (e.g. 'caption' for the shapes data set).")
  _require(m.clip.image_size == d.image_size, f"model.clip.image_size={m.clip.image_size} must "
           f"be data.image_size={d.image_size}.")


def _validate_attention(config: ml_collections.ConfigDict) -> None:
  """Warns about attention sizes the U-Net lacks: they silently add no attention.

  A warning, not an error: the middle block has attention whatever they say, and
  one config serves several image sizes (configs/test.py's (4,) at 32 px).
  """
  d, m = config.data, config.model
  if m.patch_size < 1 or not m.ch_mult:
    return  # the model's own checks say what is wrong
  sizes = [d.image_size // m.patch_size // 2**i for i in range(len(m.ch_mult))]
  names = ("attn_resolutions",) + (("cross_attn_resolutions",) if m.cross_attn_dim else ())
  for name in names:
    bad = [r for r in m[name] if r not in sizes]
    if bad:
      warnings.warn(f"model.{name}={tuple(m[name])} names feature-map size(s) {bad} the "
                    f"U-Net does not have, so they add no attention; its sizes are {sizes} "
                    "(data.image_size / model.patch_size / 2^level).", UserWarning,
                    stacklevel=3)


def validate_sample(config: ml_collections.ConfigDict) -> None:
  """What sample and eval modes check before any work: the `sample` section and
  the conditioning it asks of the model (labels, captions, guidance)."""
  s, steps = config.sample, config.diffusion.num_timesteps
  _one_of("sample.method", s.method, samplers.METHODS)
  _one_of("sample.variance", s.variance, diffusion.VARIANCES)
  _require(0 <= s.num_steps <= steps,
           f"sample.num_steps={s.num_steps} must be in [0, diffusion.num_timesteps="
           f"{steps}] (0 means all).")
  _require(s.method != "dpm_solver++" or s.num_steps >= 2,
           "sample.method=dpm_solver++ needs sample.num_steps >= 2.")
  _require(s.num_samples > 0 and s.batch_size > 0,
           "sample.num_samples and sample.batch_size must be > 0.")
  _require(s.eta >= 0.0, f"sample.eta must be >= 0 (0 is deterministic DDIM), got {s.eta}.")
  _require(s.checkpoint_step >= -1, f"sample.checkpoint_step must be a step or -1 (the "
           f"latest), got {s.checkpoint_step}.")
  _one_of("sample.thresholding", s.thresholding, samplers.THRESHOLDINGS)
  _validate_conventions(s, steps)
  _require(0.0 < s.dynamic_threshold_percentile <= 100.0,
           f"sample.dynamic_threshold_percentile must be in (0, 100], got "
           f"{s.dynamic_threshold_percentile}.")
  _require(s.guidance_scale >= 0.0, f"sample.guidance_scale must be >= 0, got "
           f"{s.guidance_scale}.")
  conditioning.validate(config)


def _validate_conventions(s: ml_collections.ConfigDict, steps: int) -> None:
  """sample.timestep_spacing and sample.ddim_eps (matching diffusers' schedulers)."""
  _one_of("sample.timestep_spacing", s.timestep_spacing, samplers.TIMESTEP_SPACINGS)
  _one_of("sample.ddim_eps", s.ddim_eps, samplers.DDIM_EPS)
  if s.timestep_spacing == "uniform":
    return
  _require(s.method in ("ancestral", "ddim"), f"sample.timestep_spacing="
           f"{s.timestep_spacing!r} is for sample.method 'ancestral' or 'ddim'; "
           f"{s.method} steps on its own log-SNR grid: set sample.timestep_spacing='uniform'.")
  if s.timestep_spacing == "nested":
    return
  try:
    samplers.diffusers_timesteps(steps, s.num_steps or steps, s.timestep_spacing)
  except ValueError as e:
    raise ValueError(f"Bad config: sample.{e}") from None
