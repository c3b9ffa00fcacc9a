"""diffusers scheduler configs <-> this project's `diffusion` and `sample` fields.

A published DDPM folder carries a `scheduler_config.json` (DDPMScheduler, or
DDIMScheduler and others with the same fields) beside the U-Net. Its schedule
becomes `config.diffusion`, its sampling choices `config.sample`. Fields that
would change the maths and have no equivalent here are errors naming them.

One difference is known and accepted: diffusers computes its betas and alpha-bars
in float32, this project in float64 (stored as float32), so alpha-bar differs by
up to about 2e-4 relative near t = 1 (docs/reproduce.md).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from diffusion_jax.convert.diffusers_unet import ConversionError

# beta_schedule -> (this project's schedule, whether beta_start/beta_end apply).
_SCHEDULES = {"linear": ("linear", True), "scaled_linear": ("quad", True),
              "sigmoid": ("sigmoid", True), "squaredcos_cap_v2": ("cosine", False)}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large"}
_SPACINGS = ("linspace", "leading", "trailing")
# The project's betas for T steps are DDPM's ends scaled by 1000 / T.
_BETA_START, _BETA_END = 1e-4, 0.02
_KNOWN_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                  "PNDMScheduler", "EulerDiscreteScheduler")


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def config_fields(sched: Mapping[str, Any], source: str = "scheduler_config.json"
                  ) -> dict[str, dict[str, Any]]:
  """`{"diffusion": {...}, "sample": {...}}` overrides from a scheduler config.

  Args:
    sched: the parsed scheduler config.
    source: how to name the file in errors.

  Raises:
    ConversionError: naming every field with no exact equivalent.
  """
  cls = sched.get("_class_name", "DDPMScheduler")
  get = lambda k, d: sched.get(k, d)
  bad = []
  if cls not in _KNOWN_CLASSES:
    bad.append(f"_class_name={cls!r} (one of {list(_KNOWN_CLASSES)})")
  if get("trained_betas", None) is not None:
    bad.append("trained_betas (an explicit beta list; only named schedules convert)")
  if get("rescale_betas_zero_snr", False):
    bad.append("rescale_betas_zero_snr=true (zero-terminal-SNR rescaling)")
  if get("thresholding", False):
    bad.append("thresholding=true (diffusers' dynamic thresholding clamps to "
               "sample_max_value; set sample.thresholding='dynamic' by hand after import)")
  if get("use_karras_sigmas", False) or get("use_exponential_sigmas", False):
    bad.append("use_karras_sigmas / use_exponential_sigmas (other sigma grids)")
  T = int(get("num_train_timesteps", 1000))
  name = get("beta_schedule", "linear")
  if name not in _SCHEDULES:
    bad.append(f"beta_schedule={name!r} (one of {sorted(_SCHEDULES)})")
  elif _SCHEDULES[name][1]:
    start, end = float(get("beta_start", 1e-4)), float(get("beta_end", 0.02))
    scale = 1000.0 / T
    if not (_close(start, scale * _BETA_START) and _close(end, scale * _BETA_END)):
      bad.append(f"beta_start={start}, beta_end={end} with num_train_timesteps={T} (this "
                 f"project's {_SCHEDULES[name][0]!r} schedule has {scale * _BETA_START:g} "
                 f"and {scale * _BETA_END:g}, DDPM's ends scaled by 1000/T)")
  pred = get("prediction_type", "epsilon")
  if pred not in _PREDICTIONS:
    bad.append(f"prediction_type={pred!r} (one of {sorted(_PREDICTIONS)})")
  variance = get("variance_type", "fixed_small")
  if cls == "DDPMScheduler" and variance not in _VARIANCES:
    bad.append(f"variance_type={variance!r} (one of {sorted(_VARIANCES)}; learned variances "
               "need a U-Net with twice the output channels)")
  clip, clip_range = get("clip_sample", True), float(get("clip_sample_range", 1.0))
  if clip and clip_range != 1.0:
    bad.append(f"clip_sample_range={clip_range} (x0 is clipped to [-1, 1] here)")
  spacing = get("timestep_spacing", "leading")
  if spacing not in _SPACINGS:
    bad.append(f"timestep_spacing={spacing!r} (one of {list(_SPACINGS)})")
  if int(get("steps_offset", 0)) != 0:
    bad.append(f"steps_offset={get('steps_offset', 0)} (only 0)")
  if bad:
    raise ConversionError(f"{source} ({cls}) has settings with no exact equivalent here:\n  "
                          + "\n  ".join(bad))
  # The spacing comes along, so sample mode with --config.sample.num_steps=N
  # visits the timesteps the published pipeline would.
  sample = dict(thresholding="static" if clip else "none",
                variance=_VARIANCES.get(variance, "fixed_small"), timestep_spacing=spacing)
  return dict(diffusion=dict(schedule=_SCHEDULES[name][0], num_timesteps=T,
                             prediction=_PREDICTIONS[pred]),
              sample=sample)


def scheduler_config(diffusion: Mapping[str, Any], sample: Mapping[str, Any]) -> dict:
  """A DDPMScheduler config for a project config (the inverse of config_fields)."""
  inverse = {v[0]: k for k, v in _SCHEDULES.items()}
  T = int(diffusion["num_timesteps"])
  scale = 1000.0 / T
  thresholding = sample.get("thresholding", "static")
  if thresholding == "dynamic":
    raise ConversionError("sample.thresholding='dynamic' has no DDPMScheduler equivalent "
                          "(its dynamic thresholding clamps to sample_max_value); export "
                          "with --config.sample.thresholding=static or none.")
  spacing = sample.get("timestep_spacing", "linspace")
  return dict(
      _class_name="DDPMScheduler", num_train_timesteps=T, beta_start=scale * _BETA_START,
      beta_end=scale * _BETA_END, beta_schedule=inverse[diffusion["schedule"]],
      trained_betas=None, variance_type=sample.get("variance", "fixed_small"),
      clip_sample=thresholding == "static", clip_sample_range=1.0,
      prediction_type={v: k for k, v in _PREDICTIONS.items()}[diffusion["prediction"]],
      thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
      # The project's own grid equals diffusers' "linspace" in its timesteps.
      timestep_spacing=spacing if spacing in _SPACINGS else "linspace",
      steps_offset=0, rescale_betas_zero_snr=False)
