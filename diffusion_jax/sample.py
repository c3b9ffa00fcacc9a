"""Sampling from a trained model: the sharded sampler and sample-only mode.

`--mode=sample` restores only the EMA parameters from an Orbax checkpoint and
writes `workdir/samples/<name>.npz` (`arr_0`: uint8 [N, H, W, C], the layout
common FID suites read) and `<name>.png` (a grid).

A class-conditional model (model.num_classes > 0) generates the classes that
`sample.labels` names ("" or "all": every class equally; "7"; "1,3,5"), with
classifier-free guidance at `sample.guidance_scale` (guidance.py); the .npz
then also holds `labels` int32 [N] and the grid shows one class per row.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import (builders, checkpointing, conditioning, config_lib, guidance,
                           metrics, parallel, samplers)
from diffusion_jax.sample_io import save_grid, save_samples  # noqa: F401 (re-exported)
from diffusion_jax.schedules import Schedule

# Folded into a sampling call's key for the noise augmentation of low_res.
_LOW_RES_AUG = 1 << 20


def _thresholding(s: ml_collections.ConfigDict) -> str:
  # Configs saved before `thresholding` existed hold `clip_denoised` instead.
  if "thresholding" in s:
    return s.thresholding
  return "static" if s.get("clip_denoised", True) else "none"


def trained_p_uncond(config: ml_collections.ConfigDict) -> float:
  """The conditioning dropout a config trains with (0 for unconditional ones)."""
  cond = config.get("conditioning", None)
  if cond is None or cond.get("type", "none") == "none":
    return 0.0
  return float(cond.get("p_uncond", 0.0))


def make_sample_fn(model, schedule: Schedule, config: ml_collections.ConfigDict,
                   batch_size: int, mesh, guided: Optional[bool] = None) -> Callable:
  """A sampler fn(params, rng, eta, labels=None, guidance_scale=None).

  It returns images [batch_size, H, W, C] in [-1, 1], the batch split over the
  mesh's data axis. A super-resolution stage also takes `low_res`, float
  [batch_size, s, s, C] in [-1, 1], noise-augmented inside at
  `superres.sample_aug_level`. `eta` and `guidance_scale` are runtime values, so changing
  them never recompiles; one compile per (batch size, sampler choice).

  For a class-conditional model, `labels` is int [batch_size], classes in
  [0, K - 1] or K, the null class, for unconditional samples (default: classes in
  turn, 0, 1, ..., K-1, 0, ...), and `guidance_scale` a scalar or a per-sample
  [batch_size] array (default `config.sample.guidance_scale`).

  Args:
    model: the Flax module.
    schedule: the diffusion schedule.
    config: the run config (sample and diffusion sections).
    batch_size: global samples per call; must divide over the mesh.
    mesh: the device mesh.
    guided: build the classifier-free-guided sampler (two passes of the
      network per step, batched). Default: when the config asks for a
      guidance scale other than 1 (a conditional sampler at scale 1 needs
      only one pass).

  Returns:
    The sampler; its `guided` attribute says which kind it is, `batch_size`
    the batch it draws, and `jitted` the underlying jitted function.
  """
  parallel.check_batch_size(batch_size, mesh, "sample batch size")
  s = config.sample
  num_classes = config.model.num_classes
  conditional = bool(num_classes) or conditioning.is_text(config)
  if guided is None:
    guided = conditional and s.get("guidance_scale", 1.0) != 1.0
  if guided and not conditional:
    raise ValueError("Guidance needs a class- or text-conditional model.")
  num_steps = None if s.num_steps == 0 else s.num_steps
  shape = (batch_size,) + builders.image_shape(config)
  data = parallel.data_sharded(mesh)
  kwargs = dict(method=s.method, num_steps=num_steps, prediction=config.diffusion.prediction,
                variance=s.variance, thresholding=_thresholding(s),
                dynamic_threshold_percentile=s.get("dynamic_threshold_percentile", 99.5))

  def fn(params, rng, eta, labels, scale, low_res, text, null_text):
    def model_fn(x, t, cond):
      x = jax.lax.with_sharding_constraint(x, data)  # keep the batch split
      return model.apply({"params": params}, x, t, cond, train=False)
    extra = {}
    if low_res is not None:  # augmented once per batch, at the fixed sampling level
      extra = conditioning.sample_low_res_cond(config, schedule, low_res,
                                               jax.random.fold_in(rng, _LOW_RES_AUG))
    if text is not None:
      cond = {**text, **extra}
      null = None
      if null_text is not None:  # only the guided sampler takes (and needs) it
        null = {**jax.tree.map(lambda a, b: jnp.broadcast_to(a, b.shape), null_text, text),
                **extra}
    elif labels is not None:
      cond = {"label": labels, **extra}
      null = {"label": guidance.null_labels(batch_size, num_classes), **extra}
    else:
      cond = null = extra or None
    if scale is None:
      denoise_fn = lambda x, t: model_fn(x, t, cond)
    else:
      denoise_fn = guidance.guided_cond_denoiser(model_fn, cond, null, scale)
    return samplers.sample(denoise_fn, schedule, shape, rng, eta=eta, **kwargs)

  jitted = jax.jit(fn, out_shardings=data)

  def sample_fn(params, rng, eta, labels=None, guidance_scale=None, low_res=None, text=None,
                null_text=None):
    labels, scale = _call_args(config, batch_size, guided, labels, guidance_scale)
    text, null_text = _check_text(config, batch_size, text, null_text, scale is not None)
    return jitted(params, rng, eta, labels, scale, _check_low_res(config, batch_size, low_res),
                  text, null_text)

  sample_fn.guided, sample_fn.jitted, sample_fn.batch_size = guided, jitted, batch_size
  return sample_fn


def _check_low_res(config, batch_size: int, low_res) -> Optional[np.ndarray]:
  """The low-resolution input of a super-resolution stage, checked (host side)."""
  if not conditioning.is_superres(config):
    if low_res is not None:
      raise ValueError("low_res was given, but the model is not a super-resolution stage "
                       "(model.low_res_channels = 0).")
    return None
  s, c = config.data.low_res_size, config.model.low_res_channels
  if low_res is None:
    raise ValueError(f"A super-resolution stage needs low_res, float [{batch_size}, {s}, {s}, "
                     f"{c}] in [-1, 1] (the previous stage's samples).")
  low_res = np.asarray(low_res, np.float32)
  if low_res.shape != (batch_size, s, s, c):
    raise ValueError(f"low_res must have shape {(batch_size, s, s, c)} (data.low_res_size="
                     f"{s}), got {low_res.shape}.")
  return low_res


def _check_text(config, batch_size: int, text, null_text, guided: bool):
  """The text arrays of a text-conditioned model, checked (host side)."""
  if not conditioning.is_text(config):
    if text is not None:
      raise ValueError("Captions (text) were given, but the model is not text-conditioned "
                       f"(conditioning.type={config.conditioning.type!r}).")
    return None, None
  if text is None:
    raise ValueError("A text-conditioned model needs text: the arrays of "
                     "text.conditioner.TextConditioner(config)(captions).")
  for key, value in text.items():
    if np.shape(value)[0] != batch_size:
      raise ValueError(f"text[{key!r}] has {np.shape(value)[0]} rows for a batch of "
                       f"{batch_size}.")
  if guided and null_text is None:
    raise ValueError("Guided sampling of a text model needs null_text (the empty caption's "
                     "arrays, TextConditioner.null(1)).")
  return text, (null_text if guided else None)


def _call_args(config, batch_size: int, guided: bool, labels, guidance_scale):
  """Host-side checks and defaults: (labels int32 [B] | None, scale [B] | None)."""
  num_classes = config.model.num_classes
  if guidance_scale is None:
    guidance_scale = config.sample.get("guidance_scale", 1.0)
  scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (batch_size,))
  if conditioning.is_text(config):
    if labels is not None:
      raise ValueError("Labels were given, but the model is text-conditioned.")
    if not guided and np.any(scale != 1.0):
      raise ValueError("This sampler was built without guidance (guided=False); build it "
                       "with guided=True to use a guidance scale other than 1.")
    return None, (scale if guided else None)
  if not num_classes:
    if labels is not None:
      raise ValueError("Labels were given, but the model is unconditional "
                       "(model.num_classes = 0).")
    if np.any(scale != 1.0):
      raise ValueError("A guidance scale other than 1 needs a class- or text-conditional "
                       "model.")
    return None, None
  if labels is None:
    labels = np.arange(batch_size) % num_classes
  labels = _checked_labels(labels, batch_size, num_classes)
  if not guided and np.any(scale != 1.0):
    raise ValueError("This sampler was built without guidance (guided=False); build it "
                     "with guided=True to use a guidance scale other than 1.")
  return labels, (scale if guided else None)


def _checked_labels(labels, batch_size: int, num_classes: int) -> np.ndarray:
  """Class indices as int32 [batch_size]; no silent cast of floats or strings,
  and nothing outside [0, num_classes] (num_classes is the null class)."""
  labels = np.asarray(labels)
  if labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype} "
                     f"(e.g. {labels.ravel()[:3].tolist()}); pass int labels, e.g. "
                     "guidance.parse_labels('1,3', num_classes, n).")
  if labels.shape != (batch_size,):
    raise ValueError(f"labels must have shape [{batch_size}], got {labels.shape}.")
  bad = labels[(labels < 0) | (labels > num_classes)]
  if bad.size:
    raise ValueError(f"Label {int(bad[0])} is out of range: this model has {num_classes} "
                     f"classes, 0 to {num_classes - 1} ({num_classes} is the null class).")
  return labels.astype(np.int32)


def _batch_slice(values, i: int, batch_size: int, num_samples: int):
  """Batch i of per-sample values [num_samples], the last padded by repetition."""
  if values is None or np.ndim(values) == 0:
    return values
  idx = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), num_samples - 1)
  return np.asarray(values)[idx]


def generate(sample_fn: Callable, params, num_samples: int, batch_size: int,
             seed: int, eta: float = 0.0, log_every_seconds: float = 10.0, *,
             labels: Optional[np.ndarray] = None, guidance_scale=None,
             low_res: Optional[np.ndarray] = None, text: Optional[dict] = None,
             null_text: Optional[dict] = None) -> np.ndarray:
  """Runs sample_fn in batches: uint8 [num_samples, H, W, C] on every host.

  Args:
    sample_fn: from `make_sample_fn`.
    params: the (EMA) parameters.
    num_samples: images to draw.
    batch_size: the sampler's batch size.
    seed: batch i uses fold_in(key(seed), i).
    eta: DDIM noise scale.
    log_every_seconds: progress log interval.
    labels: int32 [num_samples] classes to generate (class-conditional models).
    guidance_scale: a scalar or a per-sample [num_samples] array; None means
      the config's.
    low_res: float [num_samples, s, s, C] in [-1, 1], the inputs of a
      super-resolution stage.
    text: a text-conditioned model's arrays for each sample, [num_samples, ...]
      (TextConditioner); null_text: the empty caption's, [1, ...].
  """
  per_sample = {"labels": labels, "low_res": low_res,
                **{f"text[{k!r}]": v for k, v in (text or {}).items()}}
  if np.ndim(guidance_scale) > 0:
    per_sample["guidance_scale"] = guidance_scale
  _check_generate_args(sample_fn, num_samples, batch_size, per_sample)
  out, start, last = [], time.perf_counter(), 0.0
  num_batches = -(-num_samples // batch_size)
  for i in range(num_batches):
    rng = jax.random.fold_in(jax.random.key(seed), i)
    cond = {}
    if labels is not None:
      cond["labels"] = _batch_slice(labels, i, batch_size, num_samples)
    if guidance_scale is not None:
      cond["guidance_scale"] = _batch_slice(guidance_scale, i, batch_size, num_samples)
    if low_res is not None:
      cond["low_res"] = _batch_slice(low_res, i, batch_size, num_samples)
    if text is not None:
      cond["text"] = {k: _batch_slice(v, i, batch_size, num_samples) for k, v in text.items()}
      cond["null_text"] = null_text
    images = sample_fn(params, rng, jnp.float32(eta), **cond)
    out.append(metrics.to_uint8(parallel.to_host(images)))
    elapsed = time.perf_counter() - start
    if elapsed - last >= log_every_seconds or i == num_batches - 1:
      last = elapsed
      done = min((i + 1) * batch_size, num_samples)
      logging.info("sampled %d/%d images, %.1f images/s, ETA %.0fs", done, num_samples,
                   done / elapsed, (num_samples - done) * elapsed / done)
  return np.concatenate(out)[:num_samples]


def _check_generate_args(sample_fn: Callable, num_samples: int, batch_size: int,
                         per_sample: dict) -> None:
  """generate()'s counts, and one entry per sample in every per-sample input."""
  if num_samples <= 0 or batch_size <= 0:
    raise ValueError(f"num_samples and batch_size must be > 0, got {num_samples} and "
                     f"{batch_size}.")
  built = getattr(sample_fn, "batch_size", batch_size)
  if built != batch_size:
    raise ValueError(f"batch_size={batch_size}, but the sampler was built for batches of "
                     f"{built} (make_sample_fn's batch_size); pass the same number.")
  for name, values in per_sample.items():
    if values is not None and len(values) != num_samples:
      raise ValueError(f"{name} has {len(values)} entries for {num_samples} samples.")


def sample_name(config: ml_collections.ConfigDict, step: int) -> str:
  s = config.sample
  if s.name:
    return s.name
  steps = s.num_steps or config.diffusion.num_timesteps
  name = f"{s.method}{steps}_step{step}_seed{s.seed}_n{s.num_samples}"
  if s.get("guidance_scale", 1.0) != 1.0:
    name += f"_cfg{s.guidance_scale:g}"
  return name


def sample_labels(config: ml_collections.ConfigDict,
                  num_samples: int) -> Optional[np.ndarray]:
  """The labels `config.sample.labels` asks for: int32 [num_samples], or None
  for an unconditional model (where asking for labels is an error)."""
  spec = config.sample.get("labels", "")
  if not config.model.num_classes:
    if str(spec).strip():
      raise ValueError(f"sample.labels={spec!r} was given, but the model is unconditional "
                       "(model.num_classes = 0): it cannot generate chosen classes.")
    return None
  return guidance.parse_labels(spec, config.model.num_classes, num_samples)


def check_sample_request(config: ml_collections.ConfigDict,
                         trained: Optional[ml_collections.ConfigDict] = None) -> None:
  """Raises ValueError for labels or a guidance scale the model cannot honour.

  Args:
    config: the sampling config.
    trained: the config the checkpoint was trained with (its workdir's
      config.json), which says whether it learnt an unconditional model;
      default `config`.
  """
  trained = config if trained is None else trained
  sample_labels(config, 1)  # labels of an unconditional model; class range
  scale = config.sample.get("guidance_scale", 1.0)
  if scale == 1.0:
    return
  if not config.model.num_classes and not conditioning.is_text(config):
    raise ValueError(f"sample.guidance_scale={scale} needs a class- or text-conditional "
                     "model; this one is unconditional. Use 1.0.")
  if trained_p_uncond(trained) <= 0.0:
    raise ValueError(
        f"sample.guidance_scale={scale}, but the model was trained without conditioning "
        "dropout (conditioning.p_uncond = 0), so it has no unconditional model to guide "
        "with. Use sample.guidance_scale=1.0, or train with conditioning.p_uncond > 0.")


def sample_captions(config: ml_collections.ConfigDict, num_samples: int) -> list[str]:
  """The captions `sample.captions` asks for ("a;b" or "@FILE"), cycled to N."""
  spec = str(config.sample.get("captions", "")).strip()
  if not conditioning.is_text(config):
    if spec:
      raise ValueError(f"sample.captions={spec!r} was given, but the model is not "
                       "text-conditioned: it cannot follow captions.")
    return []
  if spec.startswith("@"):
    if not os.path.isfile(spec[1:]):
      raise FileNotFoundError(f"sample.captions={spec!r}: no caption file {spec[1:]!r} (one "
                              "caption per line); give its path after '@', or the captions "
                              "themselves, 'a red circle;a blue square'.")
    with open(spec[1:]) as f:
      captions = [line.strip() for line in f if line.strip()]
  else:
    captions = [c.strip() for c in spec.split(";") if c.strip()]
  if not captions:
    raise ValueError("A text-conditioned model samples from captions: set sample.captions, "
                     "e.g. --config.sample.captions='a small red circle;a large blue square' "
                     "or --config.sample.captions=@captions.txt (one per line).")
  return [captions[i % len(captions)] for i in range(num_samples)]


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Sample-only mode: latest (or configured) EMA params -> samples on disk."""
  if conditioning.is_superres(config):
    raise ValueError("This is a super-resolution stage: it samples from a low-resolution "
                     "image, so sample it in a cascade: --config=configs/cascade.py:"
                     f"BASE_DIR,{workdir}.")
  config_lib.validate_sample(config)
  checkpointing.check_compatible(workdir, config)
  trained = None
  if os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    trained = checkpointing.load_config(workdir)
  check_sample_request(config, trained)
  s = config.sample
  labels = sample_labels(config, s.num_samples)
  captions = sample_captions(config, s.num_samples)
  text = {}
  if captions:
    from diffusion_jax.text import conditioner  # pylint: disable=g-import-not-at-top
    encode = conditioner.TextConditioner(config)
    text = dict(text=encode(captions), null_text=encode.null(1))
  model, params, step, mesh = builders.restore_ema(config, workdir, s.checkpoint_step)
  logging.info("Restored EMA parameters of step %d from %s", step, workdir)
  sample_fn = make_sample_fn(model, builders.make_schedule(config), config, s.batch_size,
                             mesh)
  images = generate(sample_fn, params, s.num_samples, s.batch_size, s.seed, s.eta,
                    labels=labels, **text)
  path = None
  if jax.process_index() == 0:
    path = save_samples(os.path.join(workdir, "samples"), sample_name(config, step), images,
                        labels, captions or None)
    logging.info("Wrote %d samples to %s", len(images), path)
  return path
