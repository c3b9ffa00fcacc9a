"""The interface every kind of conditioning implements (see __init__.py)."""
from __future__ import annotations

from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from diffusion_jax.schedules import Schedule

# Purposes folded into a train step's key (train.py uses 0-2 for its own streams).
DROP, AUG_LEVEL, AUG_NOISE, BLUR, EMBED_DROP = 3, 4, 5, 6, 7


class Kind:
  """One kind of conditioning: what it adds to `cond` at init, training and sampling.

  Host methods take and return numpy; traced ones run inside jit. Subclasses
  set the class attributes and override what they need.

  Attributes:
    name: shown in messages ("class labels", "text", ...).
    inputs: the keyword arguments of a sample request this kind takes
      (`Conditioning.request(n, labels=...)`), e.g. ("labels",).
    droppable: True if training drops it at `conditioning.p_uncond`, so the
      model also learns the unconditional model and can be guided.
    upsamples: True if it is the previous cascade stage's output (the
      stage's `inputs` then name it first).
    conditioning_type: the `conditioning.type` that selects this kind (None:
      the kind overrides `active`).
    takes_guidance_scale: True if the model takes the sampler's guidance scale
      as an input (guidance_input.py) instead of being guided by two passes.
  """
  name = ""
  conditioning_type: Optional[str] = None
  inputs: tuple[str, ...] = ()
  droppable = False
  upsamples = False
  takes_guidance_scale = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def active(cls, config: ml_collections.ConfigDict) -> bool:
    """Whether `config`'s model takes this kind of conditioning."""
    return cls.conditioning_type is not None and (
        config.conditioning.type == cls.conditioning_type)

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError("Bad config: ...") for this kind's fields, active or not."""
    raise NotImplementedError

  @staticmethod
  def drop_probability(config: ml_collections.ConfigDict) -> float:
    """How often training drops this kind (if `droppable`)."""
    return config.conditioning.p_uncond

  def request_keys(self) -> tuple[str, ...]:
    """The `cond` keys a sample request carries for this kind."""
    raise NotImplementedError

  # ---- host side ---------------------------------------------------------
  def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    """A training batch (per-process numpy) made ready for `train`."""
    return batch

  def sample_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The request inputs a training grid takes from a (numpy) batch."""
    del batch
    return {}

  def batch_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The request inputs that reproduce a data batch's own conditioning (eval)."""
    return self.sample_inputs(batch)

  def request(self, num_samples: int, given: dict[str, Any]) -> tuple[dict, dict]:
    """(cond entries [N, ...], what the sample files record) of a sample request.

    Args:
      num_samples: N.
      given: this kind's inputs that the caller passed (a subset of
        `inputs`); the rest come from `config.sample`.
    """
    raise NotImplementedError

  def check(self, cond: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """This kind's entries of a sampler call's `cond`, checked (host side)."""
    return {k: np.asarray(cond[k]) for k in self.request_keys()}

  # ---- traced ------------------------------------------------------------
  def init(self, batch_size: int) -> dict[str, jax.Array]:
    """Zeros of this kind's `cond` entries, to initialise the parameters."""
    raise NotImplementedError

  def train(self, batch: dict[str, jax.Array], rng: jax.Array,
            schedule: Schedule) -> dict[str, jax.Array]:
    """This kind's `cond` entries for a training batch (dropped or augmented)."""
    raise NotImplementedError

  def for_sampling(self, cond: dict[str, jax.Array], rng: jax.Array,
                   schedule: Schedule) -> dict[str, jax.Array]:
    """A request's entries as the model takes them (once per sampled batch)."""
    del rng, schedule
    return {k: cond[k] for k in self.request_keys()}

  def null(self, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The unconditional counterpart of this kind's entries, for guidance.

    A kind that is not dropped keeps its entries: both passes share them.
    """
    return {k: cond[k] for k in self.model_keys()}

  def model_keys(self) -> tuple[str, ...]:
    """The keys of this kind in the model's `cond` (after `for_sampling`)."""
    return self.request_keys()


def rows_of(value: Any) -> Optional[int]:
  """The leading dimension of an array-like, or None for a scalar."""
  shape = np.shape(value)
  return shape[0] if shape else None
