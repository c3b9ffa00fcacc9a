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
each finished stage (steps, final loss, process CPU seconds, wall seconds).

A class-conditional teacher's students take the batch's labels. A guided one
(conditioning.p_uncond > 0) is first distilled into `OUT/guided/` (guided.py,
stage 1: a student that takes the guidance scale as an input and matches the
two-pass guided teacher at `distill.teacher_steps`), which then teaches the
rounds, every example at a scale drawn in [distill.guidance_min, guidance_max].
Its students sample guided at any scale in that range in one pass per step.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from diffusion_jax import builders, checkpointing, config_lib, guidance, models, parallel, train
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.config_checks import require as _require
from diffusion_jax.convert import workdir_io
from diffusion_jax.distill import guided, progressive

ROUNDS_FILE = "rounds.jsonl"
GUIDED_DIR = "guided"  # stage 1 of a guided teacher


def validate(config: ml_collections.ConfigDict) -> None:
  """The distill section, and a teacher this method can distil."""
  d, c = config.distill, config.conditioning
  _require(bool(d.teacher_workdir), "distill.teacher_workdir is empty: use "
           "--config=configs/distill.py:TEACHER_DIR.")
  _require(d.method == "progressive", f"distill.method={d.method!r}; valid "
           "values: progressive.")
  n, final = d.teacher_steps, d.final_steps
  ratio = n // final if final >= 1 else 0
  _require(final >= 1 and n % final == 0 and ratio >= 2 and ratio & (ratio - 1) == 0,
           f"distill.teacher_steps={n} must be final_steps={final} times a "
           "power of two >= 2 (each round halves the steps).")
  _require(n <= config.diffusion.num_timesteps, f"distill.teacher_steps={n} "
           f"exceeds the schedule's {config.diffusion.num_timesteps} timesteps.")
  _require(d.steps_per_round > 0 and d.lr > 0, "distill.steps_per_round and "
           "distill.lr must be > 0.")
  m = config.model
  if c.type not in ("none", "class") or m.low_res_channels or m.image_embed_dim:
    _require(False, f"distillation of models conditioned on "
             f"{Conditioning(config).describe()} is not implemented; distil an "
             "unconditional or class-conditional teacher.")
  _require(not m.guidance_embed, "the teacher already takes the guidance scale "
           "(a guidance-distilled student); distil the original guided teacher.")
  if is_guided(config):
    _require(d.guided_steps > 0 and 0.0 <= d.guidance_min <= d.guidance_max,
             f"a guided teacher needs distill.guided_steps > 0 and 0 <= "
             f"guidance_min <= guidance_max, got {d.guided_steps}, {d.guidance_min}, "
             f"{d.guidance_max}.")
    g = config.sample.guidance_scale
    _require(d.guidance_min <= g <= d.guidance_max, f"sample.guidance_scale={g}"
             f" (the students' grids) lies outside [distill.guidance_min, guidance_max] = "
             f"[{d.guidance_min}, {d.guidance_max}].")
  _require(config.sample.thresholding in ("none", "static"), "distillation "
           f"targets use sample.thresholding 'none' or 'static', got "
           f"{config.sample.thresholding!r}; set --config.sample.thresholding=static.")
  _require(config.model.name == "unet", f"model.name={config.model.name!r}: "
           "only U-Net image models are distilled.")


def is_guided(config: ml_collections.ConfigDict) -> bool:
  """Whether the teacher is a class-conditional model trained for guidance."""
  return config.conditioning.type == "class" and config.conditioning.p_uncond > 0


def student_steps(config: ml_collections.ConfigDict) -> list[int]:
  """The students' step counts, round by round: teacher_steps / 2, ..., final_steps."""
  out, n = [], config.distill.teacher_steps
  while n > config.distill.final_steps:
    n //= 2
    out.append(n)
  return out


def round_config(config: ml_collections.ConfigDict, n: int,
                 train_steps: int = 0) -> ml_collections.ConfigDict:
  """The run config of a student that samples with n DDIM steps and trains
  `train_steps` (default distill.steps_per_round). A guided teacher's students
  take the guidance scale as an input and no longer learn the unconditional
  model (conditioning.p_uncond = 0)."""
  d = config.distill
  c = copy.deepcopy(config)
  c.unlock()
  c.diffusion.prediction = "v"
  c.diffusion.weighting = "none"  # the distillation loss has its own weighting
  if is_guided(config):
    c.model.guidance_embed, c.conditioning.p_uncond = True, 0.0
  s = c.sample
  s.method, s.num_steps, s.timestep_spacing, s.eta = "ddim", n, "nested", 0.0
  s.checkpoint_step = -1
  t = c.training
  t.num_train_steps = train_steps or d.steps_per_round
  t.checkpoint_every_steps = min(t.checkpoint_every_steps, t.num_train_steps)
  t.sample_every_steps = t.num_train_steps  # one grid of the student, at the end
  if d.batch_size:
    t.batch_size = d.batch_size
  o = c.optim
  # Adam decayed to 0 within each round (the paper anneals linearly), no warm-up.
  o.lr, o.lr_schedule, o.warmup_steps = d.lr, "cosine", 0
  o.ema_decay, o.ema_warmup = d.ema_decay, True
  c.lock()
  config_lib.validate(c)
  return c


def _model_fn(model, params, cond):
  return lambda x, t: model.apply({"params": params}, x, t, cond, train=False)


def _install(trainer: train.Trainer, teacher_params, per_example: Callable) -> None:
  """Replaces the trainer's step by a distillation step against the teacher.

  `per_example(student_fn, teacher_params, cond, x0, rng) -> [B]` is the loss;
  `cond` is the batch's (labels and drawn guidance scales, or None).
  """
  c = trainer.config
  scales = (c.distill.guidance_min, c.distill.guidance_max) if c.model.guidance_embed else None

  def objective(params, batch, rng, t_params):
    dropout_rng, rng = jax.random.split(rng)
    cond = guided.student_cond(batch.get("label") if c.model.num_classes else None,
                               rng, scales)
    student = lambda x, t: trainer.model.apply({"params": params}, x, t, cond, train=True,
                                               rngs={"dropout": dropout_rng})
    return jnp.mean(per_example(student, t_params, cond, batch["image"], rng)), {}

  step_fn = train.train_step_fn(trainer.model, trainer.schedule, trainer.tx, trainer.config,
                                objective=objective)
  rep, data = parallel.replicated(trainer.mesh), parallel.data_sharded(trainer.mesh)
  state_sh = train.state_shardings(trainer.model, trainer.tx, trainer.config, trainer.mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, data, rep, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
  teacher_params = jax.device_put(teacher_params, rep)
  trainer.train_step = lambda state, batch, key: jitted(state, batch, key, teacher_params)


def _round_loss(teacher_model, teacher_cfg, n: int, thresholding: str) -> Callable:
  """Progressive distillation's loss: the teacher's two DDIM steps, the student's one."""
  schedule = builders.make_schedule(teacher_cfg)

  def per_example(student, t_params, cond, x0, rng):
    t_cond = _teacher_cond(cond, teacher_cfg)
    return progressive.loss(student, _model_fn(teacher_model, t_params, t_cond), schedule,
                            x0, rng, n,
                            teacher_prediction=teacher_cfg.diffusion.prediction,
                            thresholding=thresholding)
  return per_example


def _stage1_loss(teacher_model, teacher_cfg, thresholding: str) -> Callable:
  """Guidance distillation's stage 1: the guided teacher's x0 at the drawn scales."""
  num_classes = teacher_cfg.model.num_classes
  schedule = builders.make_schedule(teacher_cfg)

  def per_example(student, t_params, cond, x0, rng):
    labels = cond["label"]
    teacher = guidance.guided_cond_denoiser(
        lambda x, t, c: teacher_model.apply({"params": t_params}, x, t, c, train=False),
        {"label": labels}, {"label": guidance.null_labels(labels.shape[0], num_classes)},
        cond["guidance"])
    return guided.stage1_loss(student, teacher, schedule, x0, rng,
                              teacher_prediction=teacher_cfg.diffusion.prediction,
                              thresholding=thresholding)
  return per_example


def _teacher_cond(cond: Optional[dict], teacher_cfg: ml_collections.ConfigDict):
  """The student's cond without the guidance scale for a teacher that lacks the input."""
  if cond is None or teacher_cfg.model.guidance_embed:
    return cond
  return {k: v for k, v in cond.items() if k != "guidance"}


def _student_params(teacher_params, student_cfg: ml_collections.ConfigDict):
  """The teacher's parameters, plus a fresh guidance embedding if the student has one
  and the teacher not (its last layer is zero: the student starts as the teacher)."""
  if not student_cfg.model.guidance_embed or "guidance_emb" in teacher_params:
    return teacher_params
  model = models.create_model(student_cfg.model, student_cfg.data.channels)
  fresh = builders.init_params(model, student_cfg, jax.random.key(student_cfg.seed))
  return dict(teacher_params, guidance_emb=jax.device_get(fresh["guidance_emb"]))


def _finished(round_dir: str, steps: int) -> bool:
  if not os.path.isdir(os.path.join(round_dir, "checkpoints")):
    return False
  ckpt = checkpointing.Checkpointer(round_dir, async_save=False)
  try:
    return ckpt.latest_step() == steps
  finally:
    ckpt.close()


def _run_stage(workdir: str, name: str, rcfg, teacher_params, teacher_dir: str,
               per_example: Callable, provenance: dict) -> list[dict[str, Any]]:
  """Trains (or resumes, or skips if finished) one student in workdir/name against
  the teacher's parameters (`per_example` holds its model, as `_install` says)."""
  round_dir = os.path.join(workdir, name)
  if _finished(round_dir, rcfg.training.num_train_steps):
    return _read_records(workdir)
  if not os.path.exists(os.path.join(round_dir, checkpointing.CONFIG_FILE)):
    workdir_io.write_workdir(rcfg, _student_params(jax.device_get(teacher_params), rcfg),
                             round_dir, provenance=dict(provenance, teacher=teacher_dir))
  start_cpu, start_wall = time.process_time(), time.perf_counter()
  train.train_and_evaluate(rcfg, round_dir, customize=lambda tr: _install(
      tr, teacher_params, per_example))
  return _append_record(workdir, dict(
      stage=name, student_steps=rcfg.sample.num_steps, train_steps=rcfg.training.num_train_steps,
      final_loss=_last_loss(round_dir), cpu_seconds=round(time.process_time() - start_cpu, 1),
      wall_seconds=round(time.perf_counter() - start_wall, 1), workdir=round_dir,
      **{k: v for k, v in provenance.items() if k != "format"}))


def distill(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs (or resumes) every stage; returns the records of the finished ones.

  A guided teacher first gets stage 1 (OUT/guided: a student at the teacher's
  step count that takes the guidance scale), which then teaches the rounds.
  """
  validate(config)
  teacher_dir = config.distill.teacher_workdir
  teacher_cfg = checkpointing.load_config(teacher_dir)
  checkpointing.check_compatible(teacher_dir, config)  # the same model and schedule
  model, params, step, _ = builders.restore_ema(teacher_cfg, teacher_dir)
  logging.info("Distilling %s (EMA of step %d), %d DDIM steps -> %d", teacher_dir, step,
               config.distill.teacher_steps, config.distill.final_steps)
  threshold = config.sample.thresholding
  records = _read_records(workdir)
  if is_guided(config):
    n = config.distill.teacher_steps
    rcfg = round_config(config, n, config.distill.guided_steps)
    records = _run_stage(workdir, GUIDED_DIR, rcfg, params, teacher_dir,
                         _stage1_loss(model, teacher_cfg, threshold),
                         dict(format="guidance-distilled student (stage 1)", teacher_steps=n))
    teacher_dir, teacher_cfg = os.path.join(workdir, GUIDED_DIR), rcfg
    model, params, _, _ = builders.restore_ema(rcfg, teacher_dir)
  for n in student_steps(config):
    rcfg = round_config(config, n)
    records = _run_stage(workdir, f"steps_{n}", rcfg, params, teacher_dir,
                         _round_loss(model, teacher_cfg, n, threshold),
                         dict(format="progressive distillation student",
                              teacher_steps=2 * n))
    teacher_dir, teacher_cfg = os.path.join(workdir, f"steps_{n}"), rcfg
    model, params, _, _ = builders.restore_ema(rcfg, teacher_dir)
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
