"""Class conditioning and classifier-free guidance (Ho & Salimans 2021).

One network learns both the conditional and the unconditional model: during
training each label is replaced by the null class (index `num_classes`, the
U-Net's reserved embedding row) with probability `p_uncond`
(`drop_labels`). At sampling time `guided_denoiser` turns the conditional
model into a `denoise_fn(x_t, t)` for the samplers:

    out = out_uncond + s * (out_cond - out_uncond),   s = guidance_scale,

with the conditional and unconditional passes batched into one network call
of 2B. s = 1 is the conditional model, s = 0 the unconditional one.

Guiding the raw model output is guiding in eps space, whatever the model
predicts: eps, x0 and v are each an affine function of the others at a fixed
(x_t, t), with the same coefficients for both passes (they share x_t), and
an affine map commutes with the combination above because its weights
(1 - s) and s sum to one. So the combined output, read as eps, x0 or v,
is exactly eps_uncond + s (eps_cond - eps_uncond) in the matching form.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import DenoiseFn

# (x [B, ...], t int32 [B], cond {'label': int32 [B]}) -> model output [B, ...].
ModelFn = Callable[[jnp.ndarray, jnp.ndarray, Mapping[str, jnp.ndarray]], jnp.ndarray]
Scale = Union[float, jnp.ndarray]


def null_labels(batch_size: int, num_classes: int) -> jnp.ndarray:
  """The null class for every example: int32 [batch_size] of `num_classes`."""
  return jnp.full((batch_size,), num_classes, jnp.int32)


def drop_labels(rng: jax.Array, labels: jnp.ndarray, p_uncond: float,
                num_classes: int) -> jnp.ndarray:
  """Conditioning dropout: each label becomes the null class w.p. `p_uncond`.

  Args:
    rng: PRNG key for the Bernoulli draws (one per example).
    labels: int32 [B] in {0, ..., num_classes - 1}.
    p_uncond: probability in [0, 1) of dropping a label.
    num_classes: number of real classes; the null class is this index.

  Returns:
    int32 [B] in {0, ..., num_classes}.
  """
  drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
  return jnp.where(drop, num_classes, labels).astype(jnp.int32)


def conditional_denoiser(model_fn: ModelFn, labels: jnp.ndarray) -> DenoiseFn:
  """The plain conditional model (guidance scale 1) in one pass of B.

  Args:
    model_fn: (x, t, cond) -> model output.
    labels: int32 [B], class indices (the null class gives the unconditional
      model).
  """
  def denoise_fn(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    return model_fn(x, t, {"label": labels})
  return denoise_fn


def _scale_like(scale: Scale, x: jnp.ndarray) -> jnp.ndarray:
  s = jnp.asarray(scale, jnp.float32)
  if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != x.shape[0]):
    raise ValueError(f"guidance_scale must be a scalar or have shape [B] = "
                     f"[{x.shape[0]}], got shape {s.shape}.")
  return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def guided_denoiser(model_fn: ModelFn, labels: jnp.ndarray, num_classes: int,
                    guidance_scale: Scale, extra_cond: Optional[dict] = None) -> DenoiseFn:
  """A classifier-free-guided `denoise_fn(x_t, t)` for the samplers.

  Args:
    model_fn: (x [2B, ...], t [2B], {'label': int32 [2B], ...}) -> output
      [2B, ...] in the model's parameterisation (eps, x0 or v; see the module
      note).
    labels: int32 [B] in {0, ..., num_classes - 1}: the classes to generate.
    num_classes: real classes of the model; the null class is this index.
    guidance_scale: s, a scalar or a per-sample float array [B]; a runtime
      value (pass it as a jit argument so a new scale never recompiles).
    extra_cond: conditioning that both passes share (e.g. the low-resolution
      image of a super-resolution stage): a dict of [B, ...] arrays.

  Returns:
    denoise_fn(x [B, ...], t int32 [B]) -> float32 [B, ...], equal to
    out_uncond + s * (out_cond - out_uncond).
  """
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [B], got {labels.shape}.")
  extra = dict(extra_cond or {})
  cond = {"label": labels, **extra}
  null = {"label": null_labels(labels.shape[0], num_classes), **extra}
  return guided_cond_denoiser(model_fn, cond, null, guidance_scale)


def guided_cond_denoiser(model_fn: ModelFn, cond: dict, null_cond: dict,
                         guidance_scale: Scale) -> DenoiseFn:
  """Classifier-free guidance between any two conditionings, in one 2B pass.

  Args:
    model_fn: (x [2B, ...], t [2B], cond of [2B, ...] arrays) -> output.
    cond: the conditioning to generate, a dict of [B, ...] arrays.
    null_cond: the unconditional one, the same keys and shapes.
    guidance_scale: s, a scalar or float [B].

  Returns:
    denoise_fn(x [B, ...], t [B]) = out(null) + s * (out(cond) - out(null)).
  """
  if jax.tree.structure(cond) != jax.tree.structure(null_cond):
    raise ValueError(f"cond and null_cond differ in keys: {sorted(cond)} vs "
                     f"{sorted(null_cond)}.")
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, null_cond)

  def denoise_fn(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    b = x.shape[0]
    for key, value in cond.items():
      if value.shape[0] != b:
        raise ValueError(f"cond[{key!r}] has {value.shape[0]} entries for a batch of {b}.")
    s = _scale_like(guidance_scale, x)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   both).astype(jnp.float32)
    return out[b:] + s * (out[:b] - out[b:])
  return denoise_fn


def parse_labels(spec, num_classes: int, num_samples: int) -> np.ndarray:
  """The labels to generate: int32 [num_samples], classes in equal shares.

  Args:
    spec: "" or "all" (every class), an int or "7" (one class), or a list /
      tuple / "1,3,5" (those classes). Samples cycle through the classes, so
      each batch holds all of them and counts differ by at most one.
    num_classes: the model's real classes (> 0).
    num_samples: how many labels to return.

  Raises:
    ValueError: for an unparsable spec, an empty list, values that are not
      integers, or a class index outside [0, num_classes - 1].
  """
  if num_classes <= 0:
    raise ValueError("Labels were asked of an unconditional model (num_classes = 0).")
  if isinstance(spec, str):
    text = spec.strip().lower()
    if text in ("", "all"):
      classes = list(range(num_classes))
    else:
      try:
        classes = [int(p) for p in text.replace(" ", "").split(",") if p]
      except ValueError:
        raise ValueError(f"sample.labels={spec!r}: expected '' or 'all', a class index "
                         "such as '7', or a comma-separated list such as '1,3,5'.") from None
  else:
    values = np.atleast_1d(np.asarray(spec))
    if values.dtype.kind not in "iu":
      raise ValueError(f"Labels must be integer class indices, got {values.tolist()[:5]} "
                       f"(dtype {values.dtype}).")
    classes = [int(c) for c in values]
  if not classes:
    raise ValueError(f"sample.labels={spec!r} names no class.")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"Class index {bad[0]} is out of range: this model has "
                     f"{num_classes} classes, 0 to {num_classes - 1}.")
  return np.asarray(classes, np.int32)[np.arange(num_samples) % len(classes)]
