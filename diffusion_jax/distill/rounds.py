r"""Distillation mode: progressive distillation rounds, each an ordinary workdir.

    python -m diffusion_jax.main --mode=distill --workdir=OUT \
        --config=configs/distill.py:TEACHER_DIR [--config.distill.steps_per_round=4000]

Round by round the number of DDIM steps halves, from `distill.teacher_steps` (the
teacher sampled on the nested grid) down to `distill.final_steps`. Round n is
`OUT/steps_<n>/`: a workdir like a training run's (config.json, checkpoints,
metrics, grids) whose sampler is DDIM with n steps on the nested grid, so
`--mode=sample` and `--mode=eval` run on it as on any other. Its student starts
as a copy of its teacher (the original teacher, then the previous round's EMA
parameters), predicts v, and trains `distill.steps_per_round` steps on the loss of
`progressive.py`. Every round checkpoints as training does: the same command
resumes an interrupted round and skips finished ones. `OUT/rounds.jsonl` records
each finished round (steps, final loss, process CPU seconds, wall seconds).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from diffusion_jax import builders, checkpointing, config_lib, parallel, train
from diffusion_jax.config_checks import require as _require
from diffusion_jax.convert import workdir_io
from diffusion_jax.distill import progressive

ROUNDS_FILE = "rounds.jsonl"


def validate(config: ml_collections.ConfigDict) -> None:
  """The distill section, and a teacher this method can distil."""
  d = config.distill
  _require(bool(d.teacher_workdir), "Bad config: distill.teacher_workdir is empty: use "
           "--config=configs/distill.py:TEACHER_DIR.")
  _require(d.method == "progressive", f"Bad config: distill.method={d.method!r}; valid "
           "values: progressive.")
  n, final = d.teacher_steps, d.final_steps
  ratio = n // final if final >= 1 else 0
  _require(final >= 1 and n % final == 0 and ratio >= 2 and ratio & (ratio - 1) == 0,
           f"Bad config: distill.teacher_steps={n} must be final_steps={final} times a "
           "power of two >= 2 (each round halves the steps).")
  _require(n <= config.diffusion.num_timesteps, f"Bad config: distill.teacher_steps={n} "
           f"exceeds the schedule's {config.diffusion.num_timesteps} timesteps.")
  _require(d.steps_per_round > 0 and d.lr > 0, "Bad config: distill.steps_per_round and "
           "distill.lr must be > 0.")
  _require(config.conditioning.type == "none", "Bad config: distillation of conditional "
           f"(conditioning.type={config.conditioning.type!r}) and guided models is not "
           "implemented yet; distil an unconditional teacher.")
  _require(config.sample.thresholding in ("none", "static"), "Bad config: distillation "
           f"targets use sample.thresholding 'none' or 'static', got "
           f"{config.sample.thresholding!r}; set --config.sample.thresholding=static.")
  _require(config.model.name == "unet", f"Bad config: model.name={config.model.name!r}: "
           "only U-Net image models are distilled.")


def student_steps(config: ml_collections.ConfigDict) -> list[int]:
  """The students' step counts, round by round: teacher_steps / 2, ..., final_steps."""
  out, n = [], config.distill.teacher_steps
  while n > config.distill.final_steps:
    n //= 2
    out.append(n)
  return out


def round_config(config: ml_collections.ConfigDict, n: int) -> ml_collections.ConfigDict:
  """The student's run config for the round whose student takes n steps."""
  d = config.distill
  c = copy.deepcopy(config)
  c.unlock()
  c.diffusion.prediction = "v"
  c.diffusion.weighting = "none"  # the distillation loss has its own weighting
  s = c.sample
  s.method, s.num_steps, s.timestep_spacing, s.eta = "ddim", n, "nested", 0.0
  s.checkpoint_step = -1
  t = c.training
  t.num_train_steps = d.steps_per_round
  t.checkpoint_every_steps = min(t.checkpoint_every_steps, d.steps_per_round)
  t.sample_every_steps = d.steps_per_round  # one grid of the student, at the end
  if d.batch_size:
    t.batch_size = d.batch_size
  o = c.optim
  # Adam decayed to 0 within each round (the paper anneals linearly), no warm-up.
  o.lr, o.lr_schedule, o.warmup_steps = d.lr, "cosine", 0
  o.ema_decay, o.ema_warmup = d.ema_decay, True
  c.lock()
  config_lib.validate(c)
  return c


def _teacher_fn(model, params):
  return lambda x, t: model.apply({"params": params}, x, t, None, train=False)


def _install_step(trainer: train.Trainer, teacher_model, teacher_params, teacher_prediction: str,
                  n: int, thresholding: str) -> None:
  """Replaces the trainer's step by a distillation step against the teacher."""
  def objective(params, batch, rng, t_params):
    dropout_rng, rng = jax.random.split(rng)
    student = lambda x, t: trainer.model.apply({"params": params}, x, t, None, train=True,
                                               rngs={"dropout": dropout_rng})
    per_example = progressive.loss(student, _teacher_fn(teacher_model, t_params),
                                   trainer.schedule, batch["image"], rng, n,
                                   teacher_prediction=teacher_prediction,
                                   thresholding=thresholding)
    return jnp.mean(per_example), {}

  step_fn = train.train_step_fn(trainer.model, trainer.schedule, trainer.tx, trainer.config,
                                objective=objective)
  rep, data = parallel.replicated(trainer.mesh), parallel.data_sharded(trainer.mesh)
  state_sh = train.state_shardings(trainer.model, trainer.tx, trainer.config, trainer.mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, data, rep, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
  teacher_params = jax.device_put(teacher_params, rep)
  trainer.train_step = lambda state, batch, key: jitted(state, batch, key, teacher_params)


def _finished(round_dir: str, steps: int) -> bool:
  if not os.path.isdir(os.path.join(round_dir, "checkpoints")):
    return False
  ckpt = checkpointing.Checkpointer(round_dir, async_save=False)
  try:
    return ckpt.latest_step() == steps
  finally:
    ckpt.close()


def distill(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) every round; returns the records of the finished rounds."""
  validate(config)
  teacher_dir = config.distill.teacher_workdir
  teacher_cfg = checkpointing.load_config(teacher_dir)
  checkpointing.check_compatible(teacher_dir, config)  # the same model and schedule
  model, params, step, _ = builders.restore_ema(teacher_cfg, teacher_dir)
  logging.info("Distilling %s (EMA of step %d), %d DDIM steps -> %d", teacher_dir, step,
               config.distill.teacher_steps, config.distill.final_steps)
  prediction = teacher_cfg.diffusion.prediction
  records = _read_records(workdir)
  for n in student_steps(config):
    round_dir = os.path.join(workdir, f"steps_{n}")
    rcfg = round_config(config, n)
    if not _finished(round_dir, rcfg.training.num_train_steps):
      if not os.path.exists(os.path.join(round_dir, checkpointing.CONFIG_FILE)):
        workdir_io.write_workdir(rcfg, jax.device_get(params), round_dir, provenance=dict(
            format="progressive distillation student", teacher=teacher_dir,
            teacher_steps=2 * n, student_steps=n))
      start_cpu, start_wall = time.process_time(), time.perf_counter()
      train.train_and_evaluate(rcfg, round_dir, customize=lambda tr, n=n, p=params, pr=prediction:
                               _install_step(tr, model, p, pr, n, rcfg.sample.thresholding))
      records = _append_record(workdir, dict(
          student_steps=n, teacher_steps=2 * n, train_steps=rcfg.training.num_train_steps,
          final_loss=_last_loss(round_dir), cpu_seconds=round(time.process_time() - start_cpu, 1),
          wall_seconds=round(time.perf_counter() - start_wall, 1), workdir=round_dir))
    model, params, _, _ = builders.restore_ema(rcfg, round_dir)
    prediction, teacher_dir = "v", round_dir
  return records


def _last_loss(round_dir: str):
  path = os.path.join(round_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [json.loads(line) for line in f if '"loss"' in line]
  return lines[-1].get("loss") if lines else None


def _read_records(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, ROUNDS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _append_record(workdir: str, record: dict[str, Any]) -> list[dict[str, Any]]:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ROUNDS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
  return _read_records(workdir)
