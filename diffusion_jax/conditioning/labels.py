"""Class labels (conditioning.type = "class"): `cond['label']`, int32 [B].

The U-Net embeds the label (models/unet.py) with one extra row, the null
class `num_classes`; training replaces each label by it with probability
`conditioning.p_uncond`, so one network also learns the unconditional model
(classifier-free guidance, guidance.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import guidance
from diffusion_jax.conditioning import base
from diffusion_jax.config_checks import require


class Labels(base.Kind):
  """Class-conditional models: the data set's labels through a class embedding."""
  name = "class labels"
  conditioning_type = "class"
  inputs = ("labels",)
  droppable = True

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.num_classes = config.model.num_classes

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    c, m, d, s = config.conditioning, config.model, config.data, config.sample
    require(m.num_classes >= 0, f"model.num_classes must be >= 0, got {m.num_classes}.")
    if c.type == "class":
      require(d.num_classes > 0 and m.num_classes == d.num_classes,
              f"conditioning.type='class' needs model.num_classes == data.num_classes > 0; "
              f"got model.num_classes={m.num_classes}, data.num_classes={d.num_classes}.")
    else:
      require(m.num_classes == 0, f"model.num_classes={m.num_classes} builds a "
              "class-conditional model: set conditioning.type='class' (or "
              "model.num_classes=0).")
    if str(s.labels).strip():
      require(c.type == "class", f"sample.labels={s.labels!r} needs conditioning.type="
              "'class'; an unconditional model cannot generate chosen classes.")
      try:
        guidance.parse_labels(s.labels, m.num_classes, 1)
      except ValueError as e:
        require(False, str(e))

  def request_keys(self) -> tuple[str, ...]:
    return ("label",)

  def batch_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    return {"labels": batch["label"]}

  def request(self, num_samples: int, given: dict[str, Any]) -> tuple[dict, dict]:
    labels = given.get("labels")
    if labels is None:
      labels = guidance.parse_labels(self.config.sample.labels, self.num_classes, num_samples)
    labels = checked_labels(labels, num_samples, self.num_classes)
    return {"label": labels}, {"labels": labels}

  def check(self, cond: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    return {"label": checked_labels(cond["label"], batch_size, self.num_classes)}

  def init(self, batch_size: int) -> dict[str, jax.Array]:
    return {"label": jnp.zeros((batch_size,), jnp.int32)}

  def train(self, batch, rng, schedule) -> dict[str, jax.Array]:
    del schedule
    return {"label": guidance.drop_labels(
        jax.random.fold_in(rng, base.DROP), batch["label"],
        self.config.conditioning.p_uncond, self.num_classes)}

  def null(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"label": guidance.null_labels(cond["label"].shape[0], self.num_classes)}


def checked_labels(labels, batch_size: int, num_classes: int) -> np.ndarray:
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
