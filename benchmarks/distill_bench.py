"""Distilled students against their teacher: digits quality and sampling speed, one JSON line each.

  python benchmarks/distill_bench.py --teacher=workdir/digits --distilled=workdir/digits_distill \
      [--teacher_settings=ddim:50,dpm_solver++:10,ancestral:1000:variance=fixed_small]

For the teacher, each sampler setting (benchmarks/digits_quality.py's syntax); for
every finished stage in `<distilled>/rounds.jsonl`, its own sampler (DDIM, n steps,
the nested grid). Each row: the digits metrics of `--num_samples` samples (FD and
its same-n floor, confident fraction, precision/recall) and images/s: the median
of timed one-batch draws of the already compiled sampler (at least one, repeated
until `--min_timed_seconds`), so compilation is not counted; plus the stage's
distillation CPU seconds. A class-conditional teacher (and its students) draws
every class equally at `--guidance_scale` and adds the class accuracy; the
teacher guides with two network passes per step, a guidance-distilled student
with one (`guided_passes`).
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import digits_quality as quality_bench
from diffusion_jax import builders, checkpointing, generation, guidance, xla_flags
from diffusion_jax.distill import rounds
from diffusion_jax.evaluation import digits_classifier, digits_quality


def _row(args, clf, workdir: str, setting: str) -> dict:
  config = checkpointing.load_config(workdir)
  labels = None
  if config.conditioning.type == "class":  # every class equally, at --guidance_scale
    config.sample.guidance_scale = args.guidance_scale
    labels = guidance.parse_labels("all", config.model.num_classes, args.num_samples)
  model, params, step, mesh = builders.restore_ema(config, workdir)
  sample_fn, eta = quality_bench.make_sampler(model, config, mesh, setting, args)
  draw = lambda n, seed: generation.generate(
      sample_fn, params, n, args.batch_size, seed, eta,
      cond=None if labels is None else {"label": labels[:n]})
  images = draw(args.num_samples, args.seed)  # compiles
  rates, spent = [], 0.0
  while not rates or spent < args.min_timed_seconds:  # one batch of the compiled sampler
    start = time.perf_counter()
    draw(args.batch_size, args.seed + 1 + len(rates))
    seconds = time.perf_counter() - start
    spent += seconds
    rates.append(args.batch_size / seconds)
  q = digits_quality.digits_quality(images, clf, config.data.data_dir, labels=labels)
  extra = {} if labels is None else dict(
      guidance_scale=args.guidance_scale, guided_passes=2 if sample_fn.guided else 1,
      class_accuracy=round(q["class_accuracy"], 4))
  return dict(workdir=workdir, setting=setting, checkpoint_step=step, **extra,
              num_samples=args.num_samples, images_per_second=round(float(np.median(rates)), 1),
              timed_batches=len(rates),
              fd=round(q["frechet_distance"], 3), floor_fd=round(q["floor_frechet_distance"], 3),
              fd_ratio=round(q["frechet_distance_ratio"], 3),
              confident=round(q["confident_fraction"], 4), precision=round(q["precision"], 4),
              recall=round(q["recall"], 4), devices=jax.device_count())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher", required=True)
  parser.add_argument("--distilled", required=True, help="the --mode=distill workdir")
  parser.add_argument("--teacher_settings",
                      default="ddim:50,dpm_solver++:10,ancestral:1000:variance=fixed_small")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_timed_seconds", type=float, default=10.0,
                      help="repeat the timed one-batch draw until this much sampling time; "
                           "the median rate is reported")
  parser.add_argument("--guidance_scale", type=float, default=1.5,
                      help="class-conditional teachers and students: the scale of every row")
  args = parser.parse_args()
  xla_flags.apply_defaults()
  clf = digits_classifier.DigitsClassifier.load_or_train(
      checkpointing.load_config(args.teacher).data.data_dir)
  for setting in args.teacher_settings.split(","):
    print(json.dumps(dict(role="teacher", **_row(args, clf, args.teacher, setting))), flush=True)
  with open(os.path.join(args.distilled, rounds.ROUNDS_FILE)) as f:
    records = [json.loads(line) for line in f if line.strip()]
  for rec in records:
    n = rec["student_steps"]
    row = _row(args, clf, rec["workdir"], f"ddim:{n}:timestep_spacing=nested")
    print(json.dumps(dict(role="student", stage=rec.get("stage", f"steps_{n}"),
                          student_steps=n,
                          distill_cpu_seconds=rec["cpu_seconds"],
                          distill_wall_seconds=rec["wall_seconds"],
                          distill_train_steps=rec["train_steps"], **row)), flush=True)


if __name__ == "__main__":
  main()
