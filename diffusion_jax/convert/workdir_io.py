"""Converted weights in and out of an ordinary workdir.

An imported model becomes a workdir like a training run's: `config.json`, one
Orbax checkpoint holding a complete TrainState (params and EMA params both the
imported weights, a fresh optimiser state of the config's optimiser), and
`imported_from.json` saying where the weights came from. So `--mode=sample`,
`--mode=eval`, cascades, and even training (fine-tuning from the import) run on
it unchanged.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import (builders, checkpointing, config_lib, models, optim, parallel,
                           train)
from diffusion_jax.convert.diffusers_unet import ConversionError
from diffusion_jax.default_config import get_config as default_config
from diffusion_jax.train_state import TrainState

PROVENANCE_FILE = "imported_from.json"


def build_config(base: Optional[ml_collections.ConfigDict],
                 overrides: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """`base` (default: the default config) with whole fields set from `overrides`.

  Args:
    base: the config to start from (its data set, optimiser, sampling and eval
      sections are kept), or None for the default config.
    overrides: section -> {field: value}; e.g. `{"model": {...}, "data":
      {"image_size": 32, "channels": 3}, "diffusion": {...}, "sample": {...}}`.

  Raises:
    ConversionError: an override names a field the config does not have.
  """
  config = copy.deepcopy(default_config() if base is None else base)
  config.unlock()
  for section, fields in overrides.items():
    for key, value in fields.items():
      if key not in config[section]:
        raise ConversionError(f"config.{section} has no field {key!r} to set.")
      config[section][key] = value
  config.lock()
  config_lib.validate(config)
  return config


def _check_empty(workdir: str) -> None:
  """An import never writes over a run: the workdir must hold no run yet."""
  for name in (checkpointing.CONFIG_FILE, "checkpoints", PROVENANCE_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and (name != "checkpoints" or os.listdir(path)):
      raise ConversionError(f"{workdir!r} already holds a run ({path} exists); import into "
                            "a new --workdir (nothing was written).")


def check_params(model, config: ml_collections.ConfigDict, params: Any) -> None:
  """Raises ConversionError unless `params` has exactly the model's tree and shapes."""
  want = jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))
  flat_w = {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  flat_g = {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if flat_w != flat_g:
    diff = sorted(set(flat_w.items()) ^ set(flat_g.items()))[:6]
    raise ConversionError(f"converted parameters do not match the config's model: {diff}")


def write_workdir(config: ml_collections.ConfigDict, params: Any, workdir: str, *,
                  step: int = 0, provenance: Optional[dict] = None) -> None:
  """Writes `params` as checkpoint `step` of a new workdir with `config`.

  Raises:
    ConversionError: the workdir already holds a run, or `params` do not fit
      the config's model.
  """
  _check_empty(workdir)
  model = models.create_model(config.model, config.data.channels)
  check_params(model, config, params)
  mesh = parallel.mesh_from_config(config)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  shardings = train.state_shardings(model, tx, config, mesh)

  def make(p):
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=p,
                      ema_params=jax.tree.map(jnp.copy, p), opt_state=tx.init(p))

  state = jax.jit(make, out_shardings=shardings)(params)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints,
                                    async_save=False, writer=True)
  ckpt.save(step, state)
  ckpt.close()
  checkpointing.save_config(workdir, config)
  if provenance is not None and jax.process_index() == 0:
    record = dict(provenance, imported_at=datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), step=step)
    with open(os.path.join(workdir, PROVENANCE_FILE), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)


def read_ema(workdir: str, step: Optional[int] = None,
             config: Optional[ml_collections.ConfigDict] = None):
  """(config, EMA params as numpy, step) of a workdir's checkpoint."""
  config = config or checkpointing.load_config(workdir)
  _, params, step, _ = builders.restore_ema(config, workdir, step)
  return config, jax.tree.map(np.asarray, jax.device_get(params)), step
