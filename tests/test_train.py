"""End-to-end training: sharding, compile-once, checkpoints, resume, sampling."""
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
import pytest

from configs import test as test_config
from diffusion_jax import (builders, checkpointing, input_pipeline, models, optim, parallel,
                           sample, train)
from tests.conftest import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  return apply_overrides(config, **overrides)


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """A 6-step run of configs/test.py on 4 devices: checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(digits_dir)
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


def test_run_leaves_checkpoints_metrics_and_grid(trained):
  config, workdir, state = trained
  assert int(state.step) == 6
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 6]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
  assert os.path.exists(os.path.join(workdir, "grids", "step_00000006.png"))
  assert checkpointing.load_config(workdir).model.ch_mult == (1, 2)


def test_sample_mode_from_checkpoint(trained):
  config, workdir, _ = trained
  cfg = checkpointing.load_config(workdir)
  cfg.sample.num_samples, cfg.sample.method, cfg.sample.num_steps = 10, "dpm_solver++", 4
  path = sample.sample_and_save(cfg, workdir)
  images = np.load(path)["arr_0"]
  assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
  assert images.std() > 0
  assert os.path.exists(path[:-4] + ".png")


def test_resume_continues_from_latest(trained, tmp_path):
  config, workdir, _ = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  config = _config(config.data.data_dir, training__num_train_steps=8)
  state = train.train_and_evaluate(config, copy)
  assert int(state.step) == 8
  assert 8 in checkpointing.Checkpointer(copy).all_steps()


def test_corrupt_latest_checkpoint_is_set_aside(trained, tmp_path):
  config, workdir, _ = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  # Damage step 6's array data; add an unfinished step 9 (no commit file).
  state_dir = os.path.join(copy, "checkpoints", "6", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if "ocdbt" in root or name.startswith("manifest"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  os.makedirs(os.path.join(copy, "checkpoints", "9", "state"))
  trainer = train.Trainer(config, copy)
  restored = trainer.restore_or_init()
  trainer.ckpt.close()
  assert int(restored.step) == 3
  assert os.listdir(os.path.join(copy, "checkpoints_set_aside")) == ["6"]


def test_mismatched_config_names_the_fields(trained):
  config, workdir, _ = trained
  bad = _config(config.data.data_dir)
  bad.model.ch = 64
  bad.diffusion.schedule = "cosine"
  with pytest.raises(checkpointing.CheckpointError) as err:
    train.Trainer(bad, workdir)
  assert "model.ch: checkpoint has 32, config has 64" in str(err.value)
  assert "diffusion.schedule: checkpoint has 'linear', config has 'cosine'" in str(err.value)


def test_sharded_step_equals_single_device_and_compiles_once(digits_dir):
  config = _config(digits_dir, model__dropout=0.1)
  model = models.create_model(config.model, 1)
  tx = optim.make_optimizer(config.optim, 10)
  schedule = builders.make_schedule(config)
  it = input_pipeline.create_train_iterator(config.data, 8, 0)
  batches = [next(it) for _ in range(3)]
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = parallel.make_mesh(devices)
    state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
    step = train.make_train_step(model, schedule, tx, config, mesh)
    losses, lrs = [], []
    for b in batches:
      state, stats = step(state, parallel.to_global(b, mesh), jax.random.key(1))
      losses.append(float(stats["loss"]))
      lrs.append(float(stats["lr"]))
    # One compile for three calls, while the learning rate (warm-up) changes each step.
    assert step._cache_size() == 1 and len(set(lrs)) == 3
    results.append((jax.device_get(state.params), losses))
  assert len(jax.devices()) == 4
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(digits_dir, tmp_path):
  config = _config(digits_dir, optim__lr=1e30, optim__warmup_steps=0, optim__grad_clip_norm=0.0,
                   training__checkpoint_every_steps=1, training__num_train_steps=5,
                   training__sample_every_steps=0)
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r"step 2(.|\n)*checkpoint \(step 1\)"):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [1]


def test_mocked_cifar10_trains(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config("", data__name="cifar10", data__image_size=32, data__channels=3,
                   data__random_flip=True, training__num_train_steps=2,
                   training__sample_every_steps=0)
  with tfds.testing.mock_data(num_examples=32):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [2]


def _main_cmd(workdir, *args):
  return [sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir}", *args]


def _run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_bad_override_is_an_error(tmp_path):
  out = _run(_main_cmd(tmp_path, "--config=configs/test.py", "--config.optim.lrr=1e-4"))
  assert out.returncode != 0
  assert "lrr" in out.stderr
  out = _run(_main_cmd(tmp_path, "--config=configs/test.py", "--config.sample.method=euler"))
  assert out.returncode != 0 and "sample.method='euler'" in out.stderr


def test_main_sample_mode_with_overrides(trained):
  _, workdir, _ = trained
  out = _run(_main_cmd(workdir, "--mode=sample", f"--config=configs/from_workdir.py:{workdir}",
                       "--config.sample.num_samples=8", "--config.sample.num_steps=3",
                       "--config.sample.name=cli"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert np.load(os.path.join(workdir, "samples", "cli.npz"))["arr_0"].shape == (8, 16, 16, 1)


def test_exact_resume_after_sigkill(digits_dir, tmp_path):
  """A run killed mid-training and restarted ends bit-identical to one that was not."""
  steps = 24  # killed after step 9: a checkpoint at 8, 15 steps still to run
  args = ["--config=configs/test.py", f"--config.data.data_dir={digits_dir}",
          f"--config.training.num_train_steps={steps}", "--config.training.log_every_steps=1",
          "--config.training.sample_every_steps=0", "--config.training.checkpoint_every_steps=4"]
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_main_cmd(killed, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics_path = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 9:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert steps not in checkpointing.Checkpointer(killed).all_steps(), "run ended before the kill"
  out = _run(_main_cmd(killed, *args))
  assert out.returncode == 0, out.stderr[-3000:]
  config = _config(digits_dir, training__num_train_steps=steps, training__log_every_steps=1,
                   training__sample_every_steps=0, training__checkpoint_every_steps=4)
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
  trainer = train.Trainer(config, killed)
  resumed = trainer.restore_or_init()
  trainer.ckpt.close()
  assert int(resumed.step) == steps
  for a, b in zip(jax.tree.leaves(jax.device_get(reference)),
                  jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
