"""Checkpoint reliability: config changes, damaged steps, failed saves, locks, signals."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import pytree_checkpoint_handler as pytree_handler

from configs import test as test_config
from diffusion_jax import builders, checkpointing, train, workdir_lock
from tests.conftest import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.training.sample_every_steps = 0  # grids are not what these tests are about
  return apply_overrides(config, **overrides)


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """A 6-step adam run of configs/test.py: checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("ckpt_run"))
  config = _config(digits_dir)
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(trained, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(trained[1], copy)
  return copy


def _steps(workdir) -> list:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _damage(workdir, step) -> None:
  """Overwrites a step's array data and manifests (its tree metadata stays)."""
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    for name in files:
      if "ocdbt" in root or name.startswith("manifest"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")


def test_resume_adam_workdir_with_adamw_is_an_error_and_keeps_every_step(trained, tmp_path):
  config, _ = trained
  copy = _copy(trained, tmp_path)
  adamw = _config(config.data.data_dir, optim__optimizer="adamw", optim__weight_decay=0.01)
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    train.train_and_evaluate(adamw, copy)
  message = str(err.value)
  assert "holds another train state than this config builds" in message
  assert "opt_state.1.hyperparams.weight_decay: built by the config, not in the checkpoint" \
      in message
  assert "optim.optimizer: checkpoint's run has 'adam', this config has 'adamw'" in message
  assert "--config.optim.optimizer=adam" in message
  assert _steps(copy) == [3, 6]
  assert not os.path.exists(os.path.join(copy, "checkpoints_set_aside"))
  # The refused config did not replace the run's own.
  assert checkpointing.load_config(copy).optim.optimizer == "adam"
  # The advice works: the saved settings resume.
  trainer = train.Trainer(config, copy)
  assert int(trainer.restore_or_init().step) == 6
  trainer.ckpt.close()


def test_wider_model_names_the_arrays_and_shapes(trained, tmp_path):
  """A model change that check_compatible would miss (an edited config.json)."""
  config, _ = trained
  copy = _copy(trained, tmp_path)
  path = os.path.join(copy, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["model"]["ch"] = 64  # the user "fixes" the saved config by hand
  with open(path, "w") as f:
    json.dump(saved, f)
  wide = _config(config.data.data_dir, model__ch=64)
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    train.Trainer(wide, copy).restore_or_init()
  assert "params.conv_in.kernel: checkpoint [3, 3, 4, 32] float32, config [3, 3, 4, 64] " \
      "float32" in str(err.value)
  assert _steps(copy) == [3, 6]
  # Sample mode on the edited config.json: the same clear error, from the EMA restore.
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    builders.restore_ema(checkpointing.load_config(copy), copy)
  assert "ema_params.conv_in.kernel: checkpoint [3, 3, 4, 32] float32" in str(err.value)


def test_no_readable_step_is_an_error_unless_fresh_start_is_allowed(trained, tmp_path):
  config, _ = trained
  copy = _copy(trained, tmp_path)
  _damage(copy, 3)
  _damage(copy, 6)
  trainer = train.Trainer(config, copy)
  with pytest.raises(checkpointing.NoRestorableCheckpointError) as err:
    trainer.restore_or_init()
  assert "None of the checkpoint steps" in str(err.value)
  assert "step 6:" in str(err.value) and "step 3:" in str(err.value)
  assert "--allow_fresh_start" in str(err.value)
  assert _steps(copy) == [3, 6]  # nothing moved
  assert not os.path.exists(os.path.join(copy, "checkpoints_set_aside"))
  state = trainer.restore_or_init(allow_fresh_start=True)
  trainer.ckpt.close()
  assert int(state.step) == 0
  assert sorted(os.listdir(os.path.join(copy, "checkpoints_set_aside"))) == ["3", "6"]


def test_a_reader_never_cleans_up_a_save_in_flight(trained, tmp_path):
  """Sample/eval on a live run's workdir must not delete its uncommitted save."""
  copy = _copy(trained, tmp_path)
  in_flight = os.path.join(copy, "checkpoints", "9", "state")
  os.makedirs(in_flight)  # a step without its commit file: a save in progress
  reader = checkpointing.Checkpointer(copy)
  assert reader.all_steps() == [3, 6]
  reader.close()
  assert os.path.isdir(in_flight)


def test_truncated_or_edited_config_json_is_a_clear_error(trained, tmp_path):
  config, _ = trained
  copy = _copy(trained, tmp_path)
  path = os.path.join(copy, "config.json")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[: len(text) // 2])
  for call in (lambda: checkpointing.load_config(copy), lambda: train.Trainer(config, copy)):
    with pytest.raises(checkpointing.CheckpointError, match="not valid JSON.*truncated or "
                       "edited"):
      call()
  saved = json.loads(text)
  del saved["model"]
  with open(path, "w") as f:
    json.dump(saved, f)
  with pytest.raises(checkpointing.CheckpointError, match=r"lacks the config section\(s\) "
                     "model"):
    checkpointing.load_config(copy)


def test_second_trainer_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path):
  workdir = str(tmp_path / "locked")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from diffusion_jax import workdir_lock; "
       f"workdir_lock.WorkdirLock({workdir!r}).acquire(); print('held', flush=True); "
       "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusyError) as err:
      workdir_lock.WorkdirLock(workdir).acquire()
    assert f"pid {holder.pid}" in str(err.value)
    assert "in use by another training run" in str(err.value)
  finally:
    holder.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
    holder.wait()
  with workdir_lock.WorkdirLock(workdir):
    pass


def test_train_refuses_a_workdir_held_by_a_live_trainer(trained, tmp_path):
  config, _ = trained
  copy = _copy(trained, tmp_path)
  with workdir_lock.WorkdirLock(copy):
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(config, copy)
  assert _steps(copy) == [3, 6]


def _failing_async_save(monkeypatch, fail_step: int, background: bool):
  """Makes Orbax's save of `fail_step`'s train state fail with ENOSPC.

  background: the write fails in Orbax's background thread (as a full disk
  does), rather than when the save is started.
  """
  original = pytree_handler.PyTreeCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    if f"/{fail_step}/" not in f"{directory}/":
      return await original(self, directory, *args, **kwargs)
    if not background:
      raise OSError(errno.ENOSPC, "No space left on device")
    futures = await original(self, directory, *args, **kwargs)

    class Failing:
      def result(self, timeout=None):
        for f in futures or []:
          f.result(timeout)
        raise OSError(errno.ENOSPC, "No space left on device")
    return [Failing()]

  monkeypatch.setattr(pytree_handler.PyTreeCheckpointHandler, "async_save", async_save)


@pytest.mark.parametrize("background", [False, True])
def test_failed_save_is_an_error_and_keeps_the_previous_step(tmp_path, monkeypatch, background):
  workdir = str(tmp_path / "ck")
  state = {"w": jnp.arange(6.0)}
  ckpt = checkpointing.Checkpointer(workdir, writer=True)
  ckpt.save(1, state)
  _failing_async_save(monkeypatch, 2, background)
  with pytest.raises(checkpointing.CheckpointSaveError) as err:
    ckpt.save(2, state)
    ckpt.close()
  message = str(err.value)
  assert "Saving checkpoint step 2" in message and "No space left on device" in message
  assert "The last complete checkpoint, step 1, is intact" in message
  monkeypatch.undo()
  reader = checkpointing.Checkpointer(workdir)
  assert reader.all_steps() == [1]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=a.sharding), state)
  restored = reader.manager.restore(1, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))).state
  np.testing.assert_array_equal(restored["w"], state["w"])
  reader.close()


def test_training_stops_on_a_failed_save_and_resumes_from_the_last_one(trained, tmp_path,
                                                                       monkeypatch):
  config, _ = trained
  copy = _copy(trained, tmp_path)
  longer = _config(config.data.data_dir, training__num_train_steps=9)
  _failing_async_save(monkeypatch, 9, background=True)  # the final save, waited for at exit
  with pytest.raises(checkpointing.CheckpointSaveError, match="step 9.*No space left on "
                     "device.*step 6, is intact"):
    train.train_and_evaluate(longer, copy)
  monkeypatch.undo()
  assert checkpointing.Checkpointer(copy).all_steps() == [3, 6]
  with workdir_lock.WorkdirLock(copy):  # the failed run left no lock behind
    pass
  trainer = train.Trainer(longer, copy)  # what the same command resumes from
  assert int(trainer.restore_or_init().step) == 6
  trainer.ckpt.close()


def test_sigterm_during_an_async_save_leaves_complete_steps(digits_dir, tmp_path, monkeypatch):
  """SIGTERM arrives while step 3's save is still being written (slowed to 1 s)."""
  workdir = str(tmp_path / "run")
  config = _config(digits_dir, training__num_train_steps=20)
  original = pytree_handler.PyTreeCheckpointHandler.async_save

  async def slow_save(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)

    class Slow:
      def result(self, timeout=None):
        time.sleep(1.0)
        for f in futures or []:
          f.result(timeout)
    return [Slow()]

  real_save = checkpointing.Checkpointer.save

  def save_then_signal(self, step, state, data_iter=None):
    real_save(self, step, state, data_iter)
    if step == 3:
      assert self.manager.is_saving_in_progress()
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(pytree_handler.PyTreeCheckpointHandler, "async_save", slow_save)
  monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_signal)
  state = train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert int(state.step) == 4  # stopped after the next step, with a checkpoint
  assert checkpointing.Checkpointer(workdir).all_steps() == [3, 4]
  model, params3, step3, _ = builders.restore_ema(config, workdir, 3)
  assert step3 == 3 and np.isfinite(jax.tree.leaves(params3)[0]).all()
  trainer = train.Trainer(config, workdir)
  resumed = trainer.restore_or_init()
  trainer.ckpt.close()
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)),
                  jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
