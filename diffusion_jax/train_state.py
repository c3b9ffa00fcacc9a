"""The train state and the exponential moving average of parameters."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly (besides the data state).

  Attributes:
    step: int32 scalar, the number of optimiser steps taken.
    params: the network parameters.
    ema_params: their exponential moving average (used for sampling).
    opt_state: the optax state.
  """
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any


def ema_decay_at(step: jnp.ndarray, decay: float, warmup: bool) -> jnp.ndarray:
  """The EMA decay after `step` updates.

  With warmup, min(decay, (1 + n) / (10 + n)): a fixed 0.999 still weighs
  the initial parameters about 8% after 2,500 steps, so short runs ramp it.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: Any, params: Any, decay: jnp.ndarray) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                      ema_params, params)
