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

from diffusion_jax import (checkpointing, conditioning, guidance, metrics, models, parallel,
                           samplers, schedules)
from diffusion_jax.schedules import Schedule

# Folded into a sampling call's key for the noise augmentation of low_res.
_LOW_RES_AUG = 1 << 20


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  return schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


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

  For a class-conditional model, `labels` is int32 [batch_size] (default:
  classes in turn, 0, 1, ..., K-1, 0, ...), and `guidance_scale` a scalar or a
  per-sample [batch_size] array (default `config.sample.guidance_scale`).

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
    The sampler; its `guided` attribute says which kind it is, and `jitted`
    is the underlying jitted function.
  """
  parallel.check_batch_size(batch_size, mesh, "sample batch size")
  s = config.sample
  num_classes = config.model.num_classes
  if guided is None:
    guided = bool(num_classes) and s.get("guidance_scale", 1.0) != 1.0
  if guided and not num_classes:
    raise ValueError("Guidance needs a class-conditional model (model.num_classes > 0).")
  num_steps = None if s.num_steps == 0 else s.num_steps
  shape = (batch_size,) + image_shape(config)
  data = parallel.data_sharded(mesh)
  kwargs = dict(method=s.method, num_steps=num_steps, prediction=config.diffusion.prediction,
                variance=s.variance, thresholding=_thresholding(s),
                dynamic_threshold_percentile=s.get("dynamic_threshold_percentile", 99.5))

  def fn(params, rng, eta, labels, scale, low_res):
    def model_fn(x, t, cond):
      x = jax.lax.with_sharding_constraint(x, data)  # keep the batch split
      return model.apply({"params": params}, x, t, cond, train=False)
    extra = {}
    if low_res is not None:  # augmented once per batch, at the fixed sampling level
      extra = conditioning.sample_low_res_cond(config, schedule, low_res,
                                               jax.random.fold_in(rng, _LOW_RES_AUG))
    if labels is None:
      denoise_fn = lambda x, t: model_fn(x, t, extra or None)
    elif scale is None:
      denoise_fn = lambda x, t: model_fn(x, t, {"label": labels, **extra})
    else:
      denoise_fn = guidance.guided_denoiser(model_fn, labels, num_classes, scale, extra)
    return samplers.sample(denoise_fn, schedule, shape, rng, eta=eta, **kwargs)

  jitted = jax.jit(fn, out_shardings=data)

  def sample_fn(params, rng, eta, labels=None, guidance_scale=None, low_res=None):
    labels, scale = _call_args(config, batch_size, guided, labels, guidance_scale)
    return jitted(params, rng, eta, labels, scale, _check_low_res(config, batch_size, low_res))

  sample_fn.guided, sample_fn.jitted = guided, jitted
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


def _call_args(config, batch_size: int, guided: bool, labels, guidance_scale):
  """Host-side checks and defaults: (labels int32 [B] | None, scale [B] | None)."""
  num_classes = config.model.num_classes
  if guidance_scale is None:
    guidance_scale = config.sample.get("guidance_scale", 1.0)
  scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (batch_size,))
  if not num_classes:
    if labels is not None:
      raise ValueError("Labels were given, but the model is unconditional "
                       "(model.num_classes = 0).")
    if np.any(scale != 1.0):
      raise ValueError("A guidance scale other than 1 needs a class-conditional model.")
    return None, None
  if labels is None:
    labels = np.arange(batch_size) % num_classes
  labels = np.asarray(labels, np.int32)
  if labels.shape != (batch_size,):
    raise ValueError(f"labels must have shape [{batch_size}], got {labels.shape}.")
  if not guided and np.any(scale != 1.0):
    raise ValueError("This sampler was built without guidance (guided=False); build it "
                     "with guided=True to use a guidance scale other than 1.")
  return labels, (scale if guided else None)


def init_params(model, config: ml_collections.ConfigDict, rng: jax.Array):
  """The model's initial parameters, from a dummy batch of one image."""
  x = jnp.zeros((1,) + image_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init(rng, x, t, conditioning.init_cond(config), train=False)["params"]


def abstract_params(model, config: ml_collections.ConfigDict, mesh):
  """Parameter shapes (jax.ShapeDtypeStruct, replicated) without allocating."""
  shapes = jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)


def _batch_slice(values, i: int, batch_size: int, num_samples: int):
  """Batch i of per-sample values [num_samples], the last padded by repetition."""
  if values is None or np.ndim(values) == 0:
    return values
  idx = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), num_samples - 1)
  return np.asarray(values)[idx]


def generate(sample_fn: Callable, params, num_samples: int, batch_size: int,
             seed: int, eta: float = 0.0, log_every_seconds: float = 10.0, *,
             labels: Optional[np.ndarray] = None, guidance_scale=None,
             low_res: Optional[np.ndarray] = None) -> np.ndarray:
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
  """
  for name, values in (("labels", labels), ("low_res", low_res)):
    if values is not None and len(values) != num_samples:
      raise ValueError(f"{name} has {len(values)} entries for {num_samples} samples.")
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
    images = sample_fn(params, rng, jnp.float32(eta), **cond)
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
  name = f"{s.method}{steps}_step{step}_seed{s.seed}_n{s.num_samples}"
  if config.model.num_classes and s.get("guidance_scale", 1.0) != 1.0:
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
  if not config.model.num_classes:
    raise ValueError(f"sample.guidance_scale={scale} needs a class-conditional model; this "
                     "one is unconditional (model.num_classes = 0). Use 1.0.")
  if trained_p_uncond(trained) <= 0.0:
    raise ValueError(
        f"sample.guidance_scale={scale}, but the model was trained without conditioning "
        "dropout (conditioning.p_uncond = 0), so it has no unconditional model to guide "
        "with. Use sample.guidance_scale=1.0, or train with conditioning.p_uncond > 0.")


def save_grid(path: str, images: np.ndarray, labels: Optional[np.ndarray] = None,
              max_rows: int = 100, max_cols: int = 16) -> np.ndarray:
  """Writes a PNG grid: one class per row (sorted) when labels are given.

  Args:
    path: the .png to write.
    images: uint8 [N, H, W, C].
    labels: int32 [N] or None (then the first 256 images, square).
    max_rows: most classes shown (the lowest indices).
    max_cols: most images per class.

  Returns:
    The grid before upscaling, uint8 [H', W', C].
  """
  upscale = max(1, 64 // images.shape[1])
  if labels is None:
    tiles, ncol = images[:256], None
  else:
    classes = np.unique(labels)[:max_rows]
    ncol = min(max_cols, max(int(np.sum(labels == c)) for c in classes))
    tiles = np.zeros((len(classes) * ncol,) + images.shape[1:], np.uint8)
    for r, c in enumerate(classes):
      row = images[labels == c][:ncol]
      tiles[r * ncol:r * ncol + len(row)] = row
  grid = metrics.make_grid(tiles, nrow=ncol)
  metrics.save_image_grid(path, tiles, nrow=ncol, upscale=upscale)
  return grid


def save_samples(directory: str, name: str, images: np.ndarray,
                 labels: Optional[np.ndarray] = None) -> str:
  """Writes <name>.npz (arr_0 uint8 NHWC, and `labels` int32 [N] if given) and
  <name>.png (one class per row when labelled); returns the npz path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name + ".npz")
  tmp = path + ".tmp.npz"
  arrays = dict(arr_0=images)
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int32)
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # never leave a half-written result under the real name
  save_grid(os.path.join(directory, name + ".png"), images, labels)
  return path


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Sample-only mode: latest (or configured) EMA params -> samples on disk."""
  checkpointing.check_compatible(workdir, config)
  trained = None
  if os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    trained = checkpointing.load_config(workdir)
  check_sample_request(config, trained)
  s = config.sample
  labels = sample_labels(config, s.num_samples)
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  params, step = ckpt.restore_ema_params(abstract_params(model, config, mesh),
                                         s.checkpoint_step)
  ckpt.close()
  logging.info("Restored EMA parameters of step %d from %s", step, ckpt.directory)
  sample_fn = make_sample_fn(model, make_schedule(config), config, s.batch_size, mesh)
  images = generate(sample_fn, params, s.num_samples, s.batch_size, s.seed, s.eta,
                    labels=labels)
  path = None
  if jax.process_index() == 0:
    path = save_samples(os.path.join(workdir, "samples"), sample_name(config, step), images,
                        labels)
    logging.info("Wrote %d samples to %s", len(images), path)
  return path
