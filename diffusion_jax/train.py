"""Training: the train state, the sharded train step and the training loop.

The loop body reads: step, then maybe_log, maybe_sample, maybe_checkpoint.
The train step is one `jax.jit` over a mesh of every device of every host:
the batch is split over all devices and the state donated; the state is
replicated, or split over the mesh's "fsdp" axis (config.parallel).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
import optax
from absl import logging

from diffusion_jax import (builders, checkpointing, config_lib, diffusion, generation,
                           input_pipeline, models, optim, parallel, preemption, run_logging,
                           sample_io, workdir_lock)
from diffusion_jax.clip import training as clip_training
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.train_state import TrainState, ema_decay_at, ema_update

# Purposes folded into the root key, so each stream of randomness is separate.
_INIT, _TRAIN, _GRID = 0, 1, 2


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or infinite."""


def _init_state(model, tx, config, rng) -> TrainState:
  params = builders.init_params(model, config, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def state_shardings(model, tx, config, mesh) -> TrainState:
  """Every state array's sharding: replicated, or split over "fsdp" (see parallel)."""
  shapes = jax.eval_shape(lambda: _init_state(model, tx, config, jax.random.key(0)))
  return parallel.state_shardings(shapes, mesh, config.parallel.fsdp_min_size)


def create_train_state(model, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, rng: jax.Array, mesh) -> TrainState:
  """Initialises the state directly in its sharded layout on the mesh.

  With FSDP no device ever holds the whole state: each computes its shards.
  """
  return jax.jit(lambda r: _init_state(model, tx, config, r),
                 out_shardings=state_shardings(model, tx, config, mesh))(rng)


def abstract_train_state(model, tx, config, mesh) -> TrainState:
  """The state's shapes with shardings, for restoring without allocating."""
  shapes = jax.eval_shape(lambda: _init_state(model, tx, config, jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, state_shardings(model, tx, config, mesh))


def make_train_step(model, schedule, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh,
                    conditioning: Optional[Conditioning] = None) -> Callable:
  """A jitted (state, batch, key) -> (state, metrics) over the mesh.

  Algorithm 1 on a global batch: t uniform, the chosen loss, an optax update,
  then the EMA. The randomness of step n is fold_in(key, n), so a resumed run
  draws what an uninterrupted one would. The old state is donated. The
  model's conditioning comes from the batch (`Conditioning.train`: labels or
  captions dropped at conditioning.p_uncond, a super-resolution stage's
  low-resolution image augmented); pass the run's `conditioning` to share its
  text encoder.
  """
  step_fn = train_step_fn(model, schedule, tx, config, conditioning)
  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state_sh = state_shardings(model, tx, config, mesh)
  return jax.jit(step_fn, in_shardings=(state_sh, data, rep), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


def train_step_fn(model, schedule, tx: optax.GradientTransformation,
                  config: ml_collections.ConfigDict,
                  conditioning: Optional[Conditioning] = None,
                  objective: Optional[Callable] = None) -> Callable:
  """The un-jitted step of `make_train_step` (benchmarks wrap it differently).

  `objective(params, batch, rng, *extra) -> (loss, aux)` replaces the model's own
  loss (distillation passes its teacher's parameters as `extra`); the step is
  then `step_fn(state, batch, key, *extra)`.
  """
  o = config.optim
  if objective is None:
    objective = (clip_training.loss_fn(model, config) if config.model.name == "clip" else
                 _diffusion_loss_fn(model, schedule, config,
                                    conditioning or Conditioning(config)))

  def step_fn(state: TrainState, batch: dict, key: jax.Array, *extra):
    rng = jax.random.fold_in(key, state.step)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch, rng,
                                                                     *extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, o.ema_decay, o.ema_warmup)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params, decay))
    stats = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=optim.current_lr(opt_state), ema_decay=decay)
    return new_state, stats

  return step_fn


def _diffusion_loss_fn(model, schedule, config: ml_collections.ConfigDict,
                       conditioning: Conditioning) -> Callable:
  """(params, batch, rng) -> (loss, {}): Algorithm 1 on the batch's images (or, for
  the unCLIP prior, its CLIP image embeddings), conditioned as `conditioning` says."""
  df = config.diffusion

  def fn(params, batch, rng):
    dropout_rng, diffusion_rng = jax.random.split(rng)
    cond = conditioning.train(batch, rng, schedule)

    def denoise_fn(x, t):
      return model.apply({"params": params}, x, t, cond, train=True,
                         rngs={"dropout": dropout_rng})
    per_example = diffusion.loss(denoise_fn, schedule, batch["image"], diffusion_rng,
                                 prediction=df.prediction, weighting=df.weighting,
                                 min_snr_gamma=df.min_snr_gamma)
    return jnp.mean(per_example), {}

  return fn


class Trainer:
  """Everything a run builds from its config: model, data, state, steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(config)
    self.config, self.workdir = config, workdir
    self.mesh = parallel.mesh_from_config(config)
    parallel.check_batch_size(config.training.batch_size, self.mesh)
    checkpointing.check_compatible(workdir, config)
    self.model = models.create_model(config.model, config.data.channels)
    self.schedule = builders.make_schedule(config)
    self.tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
    self.key = jax.random.key(config.seed)
    self.data_iter = input_pipeline.create_train_iterator(
        config.data, config.training.batch_size, config.seed)
    self.ckpt = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints,
                                           writer=True)
    self.conditioning = Conditioning(config)
    self.train_step = make_train_step(self.model, self.schedule, self.tx, config, self.mesh,
                                      self.conditioning)
    self.writer = run_logging.MetricWriter(workdir, enabled=jax.process_index() == 0)
    self._grid_fn, self._grid_inputs = None, None

  def next_batch(self) -> dict:
    """The next global batch on the mesh; captions become text arrays here."""
    batch = next(self.data_iter)
    if self.config.model.name == "clip":
      batch = clip_training.prepare_batch(batch, self.config.model.clip.context_length)
      return parallel.to_global(batch, self.mesh)
    if self._grid_inputs is None:  # training grids condition on the first batch's inputs
      self._grid_inputs = self.conditioning.sample_inputs(batch)
    return parallel.to_global(self.conditioning.prepare_batch(batch), self.mesh)

  def restore_or_init(self, allow_fresh_start: bool = False) -> TrainState:
    """The latest checkpoint's state, or a new one if the workdir has none.

    Raises:
      checkpointing.CheckpointMismatchError: the config builds another state.
      checkpointing.NoRestorableCheckpointError: steps exist, none reads (and
        not `allow_fresh_start`).
    """
    abstract = abstract_train_state(self.model, self.tx, self.config, self.mesh)
    state = self.ckpt.restore_latest(abstract, self.data_iter,
                                     allow_fresh_start=allow_fresh_start, config=self.config)
    if state is not None:
      logging.info("Resumed from step %d in %s", int(state.step), self.ckpt.directory)
      return state
    logging.info("No checkpoint in %s: starting from scratch.", self.ckpt.directory)
    return create_train_state(self.model, self.tx, self.config,
                              jax.random.fold_in(self.key, _INIT), self.mesh)

  def close(self) -> None:
    """Closes the metric writer, then waits for the checkpoint save in flight
    (raising checkpointing.CheckpointSaveError if it failed)."""
    self.writer.close()
    self.ckpt.close()

  def maybe_sample(self, state: TrainState, step: int) -> None:
    t = self.config.training
    if not t.sample_every_steps or (step % t.sample_every_steps and step != t.num_train_steps):
      return
    n = t.num_grid_samples
    n = -(-n // self.mesh.devices.size) * self.mesh.devices.size  # whole devices
    if self._grid_fn is None:
      self._grid_fn = generation.make_sample_fn(self.model, self.schedule, self.config, n,
                                                self.mesh, conditioning=self.conditioning)
    rng = jax.random.fold_in(jax.random.fold_in(self.key, _GRID), step)
    request = self._grid_request(n)
    images = run_logging.to_uint8(parallel.to_host(
        self._grid_fn(state.ema_params, rng, request.cond)))
    if jax.process_index() == 0:
      grid_dir = os.path.join(self.workdir, "grids")
      os.makedirs(grid_dir, exist_ok=True)
      path = os.path.join(grid_dir, f"step_{step:08d}.png")
      if request.captions:
        grid = sample_io.save_captioned_grid(path, images, request.captions)
      else:  # one class per row when class-conditional
        grid = sample_io.save_grid(path, images, request.labels)
      self.writer.write_images(step, "ema_samples", grid)

  def _grid_request(self, n: int):
    """The request of a training grid: `config.sample`'s labels, and the first
    batch's low-res images and captions (process 0's, so every host samples the
    same; after a restart, the first batch after it), cycled to n."""
    given = {}
    for key, values in (self._grid_inputs or {}).items():
      idx = np.arange(n) % len(values)
      given[key] = [values[i] for i in idx] if isinstance(values, list) else values[idx]
    request = self.conditioning.request(n, **given)
    if jax.process_count() > 1 and request.cond is not None:
      # Each host read its own first batch; the sampler needs one input everywhere.
      request.cond = multihost_utils.broadcast_one_to_all(request.cond)
    return request


def _check_finite(step: int, stats: dict, last_saved: Optional[int]) -> None:
  if not (np.isfinite(stats["loss"]) and np.isfinite(stats["grad_norm"])):
    raise NonFiniteLossError(
        f"Non-finite training values at step {step}: loss={stats['loss']}, grad_norm="
        f"{stats['grad_norm']}. Stopping; the last good checkpoint (step {last_saved}) is "
        "kept. Lower optim.lr, keep optim.grad_clip_norm > 0, or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_fresh_start: bool = False,
                       customize: Optional[Callable[["Trainer"], None]] = None) -> TrainState:
  """Trains (or resumes) the model of `config`, writing everything to workdir.

  Args:
    config: the run config.
    workdir: checkpoints, metrics and samples go here; one trainer at a time.
    allow_fresh_start: if the workdir has checkpoint steps but none can be
      read, set them aside and start from step 0 instead of raising.
    customize: called with the Trainer before the first step (distillation
      replaces its `train_step` there).

  Raises:
    workdir_lock.WorkdirBusyError: another live trainer holds the workdir.
    checkpointing.CheckpointError: the checkpoints do not fit the config, none
      can be read, or a save failed (each message says how to go on).
  """
  # Process 0 speaks for the run; the lock comes before anything touches the
  # workdir (Orbax's start-up would clean up a live run's save in flight).
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, workdir, allow_fresh_start, customize)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, allow_fresh_start: bool,
           customize: Optional[Callable[["Trainer"], None]] = None) -> TrainState:
  trainer = Trainer(config, workdir)
  try:
    if customize is not None:
      customize(trainer)
    state = trainer.restore_or_init(allow_fresh_start)
  except BaseException:
    trainer.close()
    raise
  # Only now: a config the checkpoints refused must not replace the saved one.
  checkpointing.save_config(workdir, config)
  t = config.training
  start = int(state.step)
  last_saved = start if start > 0 else None
  progress = run_logging.Progress(t.num_train_steps, start, batch_size=t.batch_size)
  train_key = jax.random.fold_in(trainer.key, _TRAIN)
  window, pending = [], None  # host-side stats since the last log; last step's stats
  last_log = (start, time.perf_counter())
  watcher = preemption.PreemptionWatcher(trainer.ckpt.reached_preemption)
  try:
    for step in range(start + 1, t.num_train_steps + 1):
      batch = trainer.next_batch()
      state, stats = trainer.train_step(state, batch, train_key)
      # Check the previous step while this one runs: no stall per step.
      if pending is not None:
        window.append(_fetch(pending, step - 1, last_saved))
      pending = stats
      if step % t.log_every_steps == 0 or step == t.num_train_steps:
        window.append(_fetch(pending, step, last_saved))
        pending = None
        now = time.perf_counter()
        rate = (step - last_log[0]) / max(now - last_log[1], 1e-9)
        _log(trainer.writer, progress, step, window, t.batch_size, rate)
        window, last_log = [], (step, now)
      # Every process asks at every step; all get the same answer (preemption.py).
      preempted = watcher.reached(step)
      if not preempted:
        trainer.maybe_sample(state, step)
      if preempted or step % t.checkpoint_every_steps == 0 or step == t.num_train_steps:
        if pending is not None:  # never save a state whose step went non-finite
          window.append(_fetch(pending, step, last_saved))
          pending = None
        trainer.ckpt.save(step, state, trainer.data_iter)
        last_saved = step
      if preempted:
        break
  finally:
    watcher.close()
    trainer.close()
  return state


def _fetch(stats: dict, step: int, last_saved: Optional[int]) -> dict:
  host = {k: float(v) for k, v in jax.device_get(stats).items()}
  _check_finite(step, host, last_saved)
  return host


def _log(writer, progress, step: int, window: list, batch_size: int,
         rate: float) -> None:
  scalars = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
  line = progress.update(step, {"loss": scalars["loss"]}, force=True)
  scalars.update(steps_per_sec=rate, images_per_sec=rate * batch_size)
  writer.write_scalars(step, scalars)
  if line:
    logging.info("%s", line)
