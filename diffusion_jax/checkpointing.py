"""Orbax checkpoints of the train state and the data iterator.

Layout under the workdir:
  config.json              the resolved config of the run (written once the
                           state is restored or created)
  train.lock               held by the live trainer (workdir_lock.py)
  checkpoints/<step>/      one Orbax step: "state" (TrainState) and "data"
                           (each process's grain iterator state)
  checkpoints_set_aside/   unreadable steps, moved out of the way once an
                           older step restored

Saves are asynchronous and atomic: a step only counts once Orbax has written
its commit file, so an interrupted or failed save never becomes the latest
step. A config that builds another state than the checkpoints hold is an
error (CheckpointMismatchError); no step is ever moved because of it.
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

from diffusion_jax import config_lib
from diffusion_jax.checkpoint_structure import (config_differences, describe_difference,
                                                flatten, override_flag, tree_signature)
from diffusion_jax.checkpoint_structure import subtree as _subtree

# Config sections that fix the parameters' shapes or meaning; a checkpoint
# cannot be used with a config that changes any of them.
MODEL_DEFINING = ("model", "diffusion", "data.image_size", "data.channels")
CONFIG_FILE = "config.json"
# Sections a saved config.json must have for any mode to use it.
REQUIRED_SECTIONS = ("data", "model", "diffusion", "optim", "training", "sample")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (missing, or made with another config)."""


class CheckpointMismatchError(CheckpointError):
  """The config builds another parameter/optimiser tree than a checkpoint holds."""


class NoRestorableCheckpointError(CheckpointError):
  """Checkpoint steps exist, but none of them can be read."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed; the previous complete step is kept."""


def mismatch_message(workdir: str, step: int, saved: dict, wanted: dict,
                     config: Optional[ml_collections.ConfigDict] = None) -> str:
  """The error text for a checkpoint whose tree differs from the config's.

  Args:
    workdir: the run's workdir.
    step: the checkpoint step compared.
    saved, wanted: tree signatures (checkpoint_structure.tree_signature) of
      the checkpoint and of the config's state.
    config: the current config, to list the fields that differ from the saved
      config.json (the likely cause) and the flags that restore them.
  """
  lines = [f"Checkpoint step {step} in {workdir!r} holds another train state than this "
           "config builds (a config change, not a damaged checkpoint). Arrays that differ:"]
  lines += describe_difference(saved, wanted)
  diffs = []
  if config is not None:
    try:
      diffs = config_differences(_read_saved_config(workdir), config_to_dict(config))
    except CheckpointError:
      pass  # no readable saved config: the array list above is all there is
  if diffs:
    lines.append(f"Settings that differ from the run's {CONFIG_FILE} (the likely cause):")
    lines += [f"  {k}: checkpoint's run has {old!r}, this config has {new!r}"
              for k, old, new in diffs[:12]]
    flags = " ".join(override_flag(k, old) for k, old, _ in diffs[:12] if old != "<missing>")
    lines.append(f"To resume, run with the saved settings (e.g. {flags}); to start fresh, "
                 "use a new --workdir.")
  else:
    lines.append(f"To resume, use the settings the run was saved with (its {CONFIG_FILE}); "
                 "to start fresh, use a new --workdir.")
  lines.append(f"Nothing was moved or deleted: every step is still in {workdir}/checkpoints.")
  return "\n".join(lines)


def _defining_fields(config_dict: dict) -> dict[str, Any]:
  flat = flatten(config_dict)
  return {k: v for k, v in flat.items()
          if any(k == p or k.startswith(p + ".") for p in MODEL_DEFINING)}


def _unused_or_added(key: str, saved: dict, current: dict) -> bool:
  """Whether a differing field is harmless: the text encoder fields of a plain
  U-Net (unused), or a model field added after the checkpoint was saved whose
  value is the module's default (which reproduces the model saved)."""
  if not key.startswith("model."):
    return False
  field = key[len("model."):]
  names = (saved.get("model.name"), current.get("model.name"))
  if field.startswith("text_") and "text_unet" not in names:
    return True
  section = field.split(".")[0]
  if section in ("prior", "clip") and section not in names:  # another model's section
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


def _read_saved_config(workdir: str) -> dict:
  """config.json of a workdir as a dict; CheckpointError if missing or damaged."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"No {CONFIG_FILE} in {workdir!r}: is it the --workdir of a "
                          "training run?")
  fix = ("It is written by training: restore it from a copy, or delete it and run training "
         "again with the run's --config (the checkpoints' own structure is still checked), "
         "or pass --config=... to sample/eval mode.")
  try:
    with open(path) as f:
      d = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}): it was truncated or edited. "
                          + fix) from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path} holds a {type(d).__name__}, not a config dict. " + fix)
  missing = [k for k in REQUIRED_SECTIONS if not isinstance(d.get(k), dict)]
  if missing:
    raise CheckpointError(f"{path} lacks the config section(s) {', '.join(missing)}: it was "
                          "edited or written by something else. " + fix)
  return d


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in a workdir (lists become tuples), laid over the defaults,
  so a run saved by an older version has every field (config_lib.over_defaults).

  Raises:
    CheckpointError: no config.json, or one that is not a run config.
  """
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  return config_lib.over_defaults(tuples(_read_saved_config(workdir)))


def check_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises CheckpointError naming every model-defining field that differs.

  Does nothing when the workdir has no saved config yet.
  """
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  saved = _defining_fields(_read_saved_config(workdir))
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
  """Saves and restores TrainState (+ data iterator) with Orbax.

  Args:
    workdir: the run's --workdir.
    keep: how many of the newest steps to keep.
    async_save: save in a background thread (the default for training).
    writer: True only for the trainer that holds the workdir's lock
      (workdir_lock.py): it may create, clean up and set aside steps. Anyone
      else (sample, eval, cascades, tests) reads only, so it can never clean
      up the uncommitted save a live run has in flight.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               writer: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.set_aside_dir = os.path.join(self.workdir, "checkpoints_set_aside")
    self.writer = writer
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=writer, cleanup_tmp_directories=writer, read_only=not writer,
        enable_async_checkpointing=async_save,
        # A step counts only once its commit file exists (measured: on local
        # disk any step-named directory would otherwise count).
        atomicity_options=ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE))
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._in_flight: Optional[int] = None  # the step of the async save not yet waited for

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Optional[Any] = None) -> None:
    """Starts an asynchronous save of `state` (and the iterator) at `step`.

    Raises:
      CheckpointSaveError: this save, or the one still in flight, failed.
    """
    self.wait()  # an error of the previous save is that step's, not this one's
    items = dict(state=ocp.args.PyTreeSave(state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._in_flight = step

  def _save_error(self, step: int, error: Exception) -> "CheckpointSaveError":
    # A fresh read-only view: the failed step is uncommitted, so it never counts.
    last = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, atomicity_options=self._options.atomicity_options)
                                 ).latest_step()
    kept = (f"The last complete checkpoint, step {last}, is intact: fix the cause (disk "
            "space, permissions, quota), then run the same command to resume from it."
            if last is not None else "There is no earlier checkpoint: fix the cause and run "
            "the same command again.")
    return CheckpointSaveError(
        f"Saving checkpoint step {step} to {self.directory} failed ({type(error).__name__}: "
        f"{error}). The run stopped rather than train on without checkpoints. {kept}")

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._in_flight = self._in_flight, None
      raise self._save_error(step, e) from e
    self._in_flight = None

  def close(self) -> None:
    """Finishes the save in flight (raising CheckpointSaveError if it failed)."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    """Orbax's preemption sync point: True on every process at the same step."""
    return self.manager.reached_preemption(step)

  def _saved_signature(self, step: int) -> dict[str, tuple]:
    """The saved train state's {path: (shape, dtype)}, read from its metadata."""
    path = os.path.join(self.directory, str(step), "state")
    meta = ocp.PyTreeCheckpointer().metadata(path)
    # Orbax answers None (with a warning), not an error, for a damaged step.
    tree = getattr(getattr(meta, "item_metadata", None), "tree", None)
    if not isinstance(tree, dict) or not tree:
      raise ValueError(f"no readable tree metadata in {path}")
    return tree_signature(tree)

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
                      "(it was written with another process count, or by an import): "
                      "restoring the train "
                      "state only; the data stream starts from its beginning.",
                      step, jax.process_count())
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def _has_data_state(self, step: int) -> bool:
    # grain.checkpoint names each process's state process_<i>-of-<count>.json.
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.directory, str(step), "data", name))

  def _set_aside(self, step: int, error: Exception) -> None:
    logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s.",
                    step, self.directory, type(error).__name__, error, self.set_aside_dir)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_dir, exist_ok=True)
      dst = os.path.join(self.set_aside_dir, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(os.path.join(self.directory, str(step)), dst)
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def restore_latest(self, abstract_state: Any, data_iter: Optional[Any] = None, *,
                     allow_fresh_start: bool = False,
                     config: Optional[ml_collections.ConfigDict] = None):
    """Restores the newest readable step.

    A step whose parameter or optimiser tree differs from `abstract_state` is
    a config change, not damage: CheckpointMismatchError, and every step stays
    where it is. An unreadable step (its tree matches, its data does not read)
    is moved to checkpoints_set_aside/ only once an older step has restored.

    Args:
      abstract_state: TrainState of jax.ShapeDtypeStruct with shardings.
      data_iter: the train iterator, restored in place when given.
      allow_fresh_start: when steps exist but none can be read, set them all
        aside and return None instead of raising.
      config: the run's config, named in a mismatch error's hints.

    Returns:
      The restored TrainState, or None if there is no checkpoint at all.

    Raises:
      CheckpointMismatchError: the newest readable step has another structure.
      NoRestorableCheckpointError: steps exist but none can be restored.
    """
    wanted, failures = tree_signature(abstract_state), []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self._saved_signature(step)
      except Exception as e:  # pylint: disable=broad-except  (any damage: try older)
        failures.append((step, e))
        continue
      if saved != wanted:
        raise CheckpointMismatchError(mismatch_message(self.workdir, step, saved, wanted,
                                                       config))
      try:
        state = self._restore_step(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for a damaged step (ValueError, OSError,
        # tensorstore errors); any of them means "use the one before".
        failures.append((step, e))
        continue
      self._set_aside_all(failures)
      return state
    if failures and not allow_fresh_start:
      raise NoRestorableCheckpointError(
          f"None of the checkpoint steps in {self.directory} can be restored:\n"
          + "\n".join(f"  step {s}: {type(e).__name__}: {str(e)[:300]}" for s, e in failures)
          + "\nNothing was moved or deleted. If the cause is passing (a storage outage), run "
          "the same command again later. To start from step 0 in this workdir anyway, pass "
          "--allow_fresh_start: the unreadable steps are then moved to "
          f"{self.set_aside_dir}.")
    self._set_aside_all(failures)
    return None

  def _set_aside_all(self, failures: list) -> None:
    if failures and not self.writer:  # only the trainer moves steps; a reader says so
      logging.warning("Unreadable checkpoint steps %s in %s (left in place): %s",
                      [s for s, _ in failures], self.directory, failures)
      return
    for step, error in failures:
      self._set_aside(step, error)

  def restore_ema_params(self, abstract_ema_params: Any, step: Optional[int] = None):
    """Restores only the EMA parameters of `step` (default: the latest).

    Returns:
      (ema_params, step).

    Raises:
      CheckpointError: no such step, or it cannot be read.
      CheckpointMismatchError: the config's model differs from the checkpoint's.
    """
    step = self.latest_step() if step is None or step < 0 else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}: train first, or pass the "
                            "--workdir of a training run.")
    if step not in self.all_steps():
      raise CheckpointError(f"No checkpoint step {step} in {self.directory}; available: "
                            f"{self.all_steps()}.")
    target = {"ema_params": abstract_ema_params}
    try:
      saved = _subtree(self._saved_signature(step), "ema_params")
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from e
    wanted = tree_signature(target)
    if saved != wanted:
      raise CheckpointMismatchError(mismatch_message(self.workdir, step, saved, wanted))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from e
    return restored.state["ema_params"], step

  def _unreadable(self, step: int, error: Exception) -> CheckpointError:
    others = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"Checkpoint step {step} in {self.directory} cannot be read ({type(error).__name__}: "
        f"{str(error)[:300]}). Pick another with --config.sample.checkpoint_step (steps: "
        f"{others}).")
