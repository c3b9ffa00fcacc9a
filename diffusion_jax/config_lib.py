"""Checks a run config's values before any work starts.

Unknown keys are already rejected by ml_collections (the config is locked);
this catches bad values with a message that says how to fix them.
"""
from __future__ import annotations

import warnings

import ml_collections

from diffusion_jax import diffusion, guidance, optim, samplers, schedules


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(f"Bad config: {message}")


def _one_of(name: str, value, valid) -> None:
  _require(value in valid, f"{name}={value!r}; valid values: {', '.join(map(str, valid))}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError("Bad config: ...") for the first bad value found."""
  d, m, df, o, t = config.data, config.model, config.diffusion, config.optim, config.training
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
  validate_sample(config)
  _require(m.num_classes >= 0, f"model.num_classes must be >= 0, got {m.num_classes}.")
  _validate_attention(config)
  pa = config.parallel
  _require(pa.fsdp_axis_size >= 1, f"parallel.fsdp_axis_size must be >= 1, got "
           f"{pa.fsdp_axis_size}.")
  _require(pa.data_axis_size == -1 or pa.data_axis_size >= 1,
           f"parallel.data_axis_size must be -1 (all the rest) or >= 1, got "
           f"{pa.data_axis_size}.")
  _require(pa.fsdp_min_size >= 0, f"parallel.fsdp_min_size must be >= 0, got "
           f"{pa.fsdp_min_size}.")
  _validate_conditioning(config)
  _validate_superres(config)


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


def _validate_attention(config: ml_collections.ConfigDict) -> None:
  """Warns about attention sizes the U-Net lacks: they silently add no attention.

  A warning, not an error: the middle block has attention whatever they say, and
  one config serves several image sizes (configs/test.py's (4,) at 32 px).
  """
  d, m = config.data, config.model
  if m.patch_size < 1 or not m.ch_mult:
    return  # the model's own checks say what is wrong
  sizes = [d.image_size // m.patch_size // 2**i for i in range(len(m.ch_mult))]
  names = ("attn_resolutions",) + (("cross_attn_resolutions",) if m.get("cross_attn_dim", 0)
                                   else ())
  for name in names:
    bad = [r for r in m.get(name, ()) if r not in sizes]
    if bad:
      warnings.warn(f"model.{name}={tuple(m[name])} names feature-map size(s) {bad} the "
                    f"U-Net does not have, so they add no attention; its sizes are {sizes} "
                    "(data.image_size / model.patch_size / 2^level).", UserWarning,
                    stacklevel=3)


def validate_sample(config: ml_collections.ConfigDict) -> None:
  """The `sample` section alone: what sample and eval modes check before any work.

  Configs saved by older versions may lack some fields; those are not checked.
  """
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
  eta, step = s.get("eta", 0.0), s.get("checkpoint_step", -1)
  _require(eta >= 0.0, f"sample.eta must be >= 0 (0 is deterministic DDIM), got {eta}.")
  _require(step >= -1, f"sample.checkpoint_step must be a step or -1 (the latest), got {step}.")
  if "thresholding" in s:
    _one_of("sample.thresholding", s.thresholding, samplers.THRESHOLDINGS)
  percentile = s.get("dynamic_threshold_percentile", 99.5)
  _require(0.0 < percentile <= 100.0,
           f"sample.dynamic_threshold_percentile must be in (0, 100], got {percentile}.")
  scale = s.get("guidance_scale", 1.0)
  _require(scale >= 0.0, f"sample.guidance_scale must be >= 0, got {scale}.")


def _validate_superres(config: ml_collections.ConfigDict) -> None:
  """A super-resolution stage: data pairs, model input and augmentation agree."""
  d, m, sr = config.data, config.model, config.superres
  # .get: configs saved before super-resolution stages existed lack these fields.
  size, channels = d.get("low_res_size", 0), m.get("low_res_channels", 0)
  _require(bool(size) == bool(channels),
           f"data.low_res_size={size} and model.low_res_channels={channels}: a "
           "super-resolution stage sets both (low_res_channels = data.channels), a base model "
           "neither.")
  if not size:
    return
  _require(0 < size < d.image_size, f"data.low_res_size={size} must lie in (0, "
           f"data.image_size={d.image_size}).")
  _require(channels == d.channels, f"model.low_res_channels={channels} "
           f"must equal data.channels={d.channels} (the low-resolution image's channels).")
  for name in ("noise_aug_max", "sample_aug_level", "blur_prob"):
    _require(0.0 <= sr[name] <= 1.0, f"superres.{name} must lie in [0, 1], got {sr[name]}.")
  _require(0.0 <= sr.blur_sigma_min <= sr.blur_sigma_max,
           f"superres.blur_sigma_min={sr.blur_sigma_min} and blur_sigma_max="
           f"{sr.blur_sigma_max} must satisfy 0 <= min <= max.")


def _validate_text(config: ml_collections.ConfigDict) -> None:
  """Text conditioning: captions in the data, an encoder the model matches."""
  c, m, d, s = config.conditioning, config.model, config.data, config.sample
  if c.type != "text":
    _require(m.name != "text_unet", "model.name='text_unet' needs conditioning.type='text'.")
    _require(not d.get("caption_key", ""), f"data.caption_key={d.get('caption_key')!r} reads "
             "captions, but the model is not text-conditioned (conditioning.type="
             f"{c.type!r}); set data.caption_key='' or conditioning.type='text'.")
    _require(not str(s.get("captions", "")).strip(),
             f"sample.captions={s.captions!r}, but the model is not text-conditioned "
             f"(conditioning.type={c.type!r}); it cannot follow captions.")
    return
  _require(bool(d.caption_key), "conditioning.type='text' needs data.caption_key (the "
           "caption feature, e.g. 'caption' for the shapes data set).")
  _one_of("conditioning.text_encoder", c.text_encoder, ("trained", "frozen"))
  want = "text_unet" if c.text_encoder == "trained" else "unet"
  _require(m.name == want, f"conditioning.text_encoder={c.text_encoder!r} needs "
           f"model.name={want!r}, got {m.name!r}.")
  _require(m.cross_attn_dim > 0 and m.cond_vector_dim > 0,
           "A text-conditioned model needs model.cross_attn_dim and model.cond_vector_dim "
           "> 0 (the text encoder's width).")
  _require(m.num_classes == 0, "A text-conditioned model takes no class labels "
           "(model.num_classes = 0).")
  _one_of("conditioning.frozen_encoder_dtype", c.get("frozen_encoder_dtype", "float32"),
          ("float32", "bfloat16"))
  length = m.text_max_length if c.text_encoder == "trained" else c.text_max_length
  _require(length >= 3, f"The text context must hold at least 3 tokens (begin, one, end); "
           f"got {length} (model.text_max_length for 'trained', conditioning.text_max_length "
           "for 'frozen').")


def _validate_conditioning(config: ml_collections.ConfigDict) -> None:
  """Conditioning and the guided-sampling fields (issue 6)."""
  c, m, d, s = config.conditioning, config.model, config.data, config.sample
  _one_of("conditioning.type", c.type, ("none", "class", "text"))
  _validate_text(config)
  _require(0.0 <= c.p_uncond < 1.0, f"conditioning.p_uncond must be in [0, 1), got {c.p_uncond}.")
  if c.type == "class":
    _require(d.num_classes > 0 and m.num_classes == d.num_classes,
             f"conditioning.type='class' needs model.num_classes == data.num_classes > 0; "
             f"got model.num_classes={m.num_classes}, data.num_classes={d.num_classes}.")
  else:
    _require(m.num_classes == 0, f"model.num_classes={m.num_classes} builds a class-conditional "
             "model: set conditioning.type='class' (or model.num_classes=0).")
  _require(s.guidance_scale == 1.0 or (c.type != "none" and c.p_uncond > 0.0),
           f"sample.guidance_scale={s.guidance_scale} needs a class- or text-conditional model "
           "trained with conditioning dropout (conditioning.p_uncond > 0); use 1.0 otherwise.")
  if str(s.labels).strip():
    _require(c.type == "class", f"sample.labels={s.labels!r} needs conditioning.type='class'; "
             "an unconditional model cannot generate chosen classes.")
    try:
      guidance.parse_labels(s.labels, m.num_classes, 1)
    except ValueError as e:
      _require(False, str(e))
