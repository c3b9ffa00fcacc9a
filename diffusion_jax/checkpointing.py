"""Orbax checkpoints of the train state and the data iterator.

Layout under the workdir:
  config.json              the resolved config of the run (written at start)
  checkpoints/<step>/      one Orbax step: "state" (TrainState) and "data"
                           (each process's grain iterator state)
  checkpoints_set_aside/   steps that failed to restore, moved out of the way

Saves are asynchronous and atomic: a step only counts once Orbax has written
its commit file, so an interrupted save never becomes the latest step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

# Config sections that fix the parameters' shapes or meaning; a checkpoint
# cannot be used with a config that changes any of them.
MODEL_DEFINING = ("model", "diffusion", "data.image_size", "data.channels")
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (missing, or made with another config)."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def _defining_fields(config_dict: dict) -> dict[str, Any]:
  flat = _flatten(config_dict)
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p + ".") for p in MODEL_DEFINING)}


def _unused_or_added(key: str, saved: dict, current: dict) -> bool:
  """Whether a differing field is harmless: the text encoder fields of a plain
  U-Net (unused), or a model field added after the checkpoint was saved whose
  value is the module's default (which reproduces the model saved)."""
  if not key.startswith("model."):
    return False
  field = key[len("model."):]
  if field.startswith("text_") and "text_unet" not in (saved.get("model.name"),
                                                        current.get("model.name")):
    return True
  # pylint: disable-next=g-import-not-at-top  (models is only needed here)
  from diffusion_jax.models.unet import UNet
  defaults = {f.name: f.default for f in dataclasses.fields(UNet)}
  value = current.get(key)
  value = list(value) if isinstance(value, tuple) else value
  return key not in saved and field in defaults and value == defaults[field]


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config beside the checkpoints (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in a workdir, as a ConfigDict (lists become tuples)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"No {CONFIG_FILE} in {workdir!r}: is it the --workdir of a "
                          "training run?")
  with open(path) as f:
    d = json.load(f)

  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  return ml_collections.ConfigDict(tuples(d))


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises CheckpointError naming every model-defining field that differs.

  Does nothing when the workdir has no saved config yet.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _defining_fields(json.load(f))
  current = _defining_fields(config_to_dict(config))
  diffs = [f"  {k}: checkpoint has {saved.get(k, '<missing>')!r}, config has "
           f"{current.get(k, '<missing>')!r}"
           for k in sorted(set(saved) | set(current))
           if saved.get(k) != current.get(k) and not _unused_or_added(k, saved, current)]
  if diffs:
    raise CheckpointError(
        f"The config does not match the checkpoints in {workdir!r}:\n" + "\n".join(diffs)
        + "\nUse the same model/diffusion/data settings, or a new --workdir.")


class Checkpointer:
  """Saves and restores TrainState (+ data iterator) with Orbax."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.set_aside_dir = os.path.abspath(os.path.join(workdir, "checkpoints_set_aside"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        # A step counts only once its commit file exists (measured: on local
        # disk any step-named directory would otherwise count).
        atomicity_options=ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE))
    self._options = options
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Optional[Any] = None) -> None:
    """Starts an asynchronous save of `state` (and the iterator) at `step`."""
    items = dict(state=ocp.args.PyTreeSave(state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _restore_step(self, step, abstract_state, data_iter):
    items = dict(state=ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
    if data_iter is not None and self._has_data_state(step):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif data_iter is not None:
      # Written by a run with another process count (e.g. a pod slice of
      # another size): each process's shard of the data differs, so no saved
      # position applies. Resume the model; the data order starts afresh.
      logging.warning("Checkpoint step %d holds no data-iterator state for %d process(es) "
                      "(it was written with another process count): restoring the train "
                      "state only; the data stream starts from its beginning.",
                      step, jax.process_count())
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def _has_data_state(self, step: int) -> bool:
    # grain.checkpoint names each process's state process_<i>-of-<count>.json.
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.directory, str(step), "data", name))

  def reached_preemption(self, step: int) -> bool:
    """Orbax's preemption sync point: True on every process at the same step."""
    return self.manager.reached_preemption(step)

  def _set_aside(self, step: int, error: Exception) -> None:
    logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); moving it to "
                    "%s and trying the one before.", step, self.directory,
                    type(error).__name__, error, self.set_aside_dir)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_dir, exist_ok=True)
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.set_aside_dir, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(src, dst)
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def restore_latest(self, abstract_state: Any, data_iter: Optional[Any] = None):
    """Restores the newest readable step; unreadable ones are set aside.

    Args:
      abstract_state: TrainState of jax.ShapeDtypeStruct with shardings.
      data_iter: the train iterator, restored in place when given.

    Returns:
      The restored TrainState, or None if there is no readable checkpoint.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self._restore_step(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for a damaged step (ValueError, OSError,
        # tensorstore errors); any of them means "use the one before".
        self._set_aside(step, e)
    return None

  def restore_ema_params(self, abstract_ema_params: Any, step: Optional[int] = None):
    """Restores only the EMA parameters of `step` (default: the latest).

    Returns:
      (ema_params, step).
    """
    step = self.latest_step() if step is None or step < 0 else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}: train first, or pass the "
                            "--workdir of a training run.")
    if step not in self.all_steps():
      raise CheckpointError(f"No checkpoint step {step} in {self.directory}; available: "
                            f"{self.all_steps()}.")
    target = {"ema_params": abstract_ema_params}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return restored.state["ema_params"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
