"""Ablations of the digits default: train each variant per seed, score its samples.

Each variant is `configs/digits.py` (or `--base_config`) set back to the recipe
before the ablations (`BEFORE`), plus its own command-line overrides, trained by
the README's own command in a subprocess (so the wall time is the whole
command's), then scored with `digits_quality.py`'s sampler settings on the EMA
parameters of the last step. One JSON line per (variant,
seed, sampler setting); the training wall time is recorded beside each
workdir, so a rerun scores finished runs without training them again.

  python benchmarks/digits_ablation.py --out_dir=/tmp/abl --seeds=0,1 \\
      --variants=base,min_snr,ssn_min_snr --settings=ancestral:100:variance=fixed_small

FD is the Frechet distance against the real TEST digits and `fd_ratio` its
ratio to the same-n floor (as many real TRAIN digits as samples; see
`diffusion_jax/evaluation/digits_quality.py`).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import digits_quality as quality_bench
from diffusion_jax import builders, checkpointing, xla_flags
from diffusion_jax.evaluation import digits_classifier, digits_quality

# The digits training recipe before these ablations (DDPM: eps, linear schedule, no
# loss weighting, constant lr, the embedding added before GroupNorm), applied first;
# each variant then changes one thing, or, last, the combination configs/digits.py
# now trains (its sampler is chosen by --settings).
BEFORE = ("--config.model.scale_shift_norm=False", "--config.diffusion.prediction=eps",
          "--config.diffusion.schedule=linear", "--config.diffusion.weighting=none",
          "--config.optim.lr_schedule=constant")
VARIANTS = {
    "base": (),
    "ssn": ("--config.model.scale_shift_norm=True",),
    "v": ("--config.diffusion.prediction=v",),
    "cosine": ("--config.diffusion.schedule=cosine",),
    "min_snr": ("--config.diffusion.weighting=min_snr",),
    "lr_cosine": ("--config.optim.lr_schedule=cosine",),
    "ssn_min_snr": ("--config.model.scale_shift_norm=True",
                    "--config.diffusion.weighting=min_snr"),
}
TRAIN_TIME_FILE = "train_seconds.json"


def _train(args, name: str, seed: int, workdir: str) -> float:
  """Runs the README's training command for one variant; returns its wall time."""
  path = os.path.join(workdir, TRAIN_TIME_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["train_seconds"]
  overrides = {}  # field -> flag, so a later setting of a field replaces an earlier one
  for flag in (*BEFORE, *VARIANTS[name], *args.extra_overrides.split()):
    overrides[flag.split("=")[0]] = flag
  cmd = [sys.executable, "-m", "diffusion_jax.main", f"--config={args.base_config}",
         f"--workdir={workdir}", f"--config.seed={seed}", *overrides.values()]
  start = time.perf_counter()
  with open(workdir + ".log", "w") as log:
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  seconds = time.perf_counter() - start
  with open(path, "w") as f:
    json.dump({"train_seconds": seconds, "command": cmd}, f)
  return seconds


def _score(args, clf, config, restored, setting: str) -> dict:
  """One sampler setting on a run's restored (model, EMA params, step, mesh)."""
  method, num_steps, extra = quality_bench.parse_setting(setting)
  model, params, step, mesh = restored
  start = time.perf_counter()
  images = quality_bench.draw(model, params, config, mesh, setting, args)
  seconds = time.perf_counter() - start
  q = digits_quality.digits_quality(images, clf, config.data.data_dir)
  hist = q["class_histogram"]
  return dict(method=method, num_steps=num_steps, **extra, checkpoint_step=step,
              sampling_seconds=round(seconds, 1), fd=round(q["frechet_distance"], 3),
              floor_fd=round(q["floor_frechet_distance"], 3),
              fd_ratio=round(q["frechet_distance_ratio"], 3),
              confident=round(q["confident_fraction"], 4),
              precision=round(q["precision"], 4), recall=round(q["recall"], 4),
              floor_precision=round(q["floor_precision"], 4),
              floor_recall=round(q["floor_recall"], 4),
              min_class=min(hist), max_class=max(hist))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", required=True, help="one workdir per variant and seed")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, from {sorted(VARIANTS)}")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--settings", default=("ddim:50,ancestral:50:variance=fixed_small,"
                                              "ancestral:100:variance=fixed_small"),
                      help="comma-separated method:steps[:key=value+...]")
  parser.add_argument("--base_config", default="configs/digits.py")
  parser.add_argument("--extra_overrides", default="", help="added to every variant")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--score_only", action="store_true",
                      help="skip variants whose workdir has no finished run")
  args = parser.parse_args()
  unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  xla_flags.apply_defaults()  # before the first computation
  clf = None
  for name in args.variants.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      workdir = os.path.join(args.out_dir, f"{name}_s{seed}")
      if args.score_only and not os.path.exists(os.path.join(workdir, TRAIN_TIME_FILE)):
        continue
      train_seconds = _train(args, name, seed, workdir)
      config = checkpointing.load_config(workdir)
      if clf is None:  # after the first run has built the data set
        clf = digits_classifier.DigitsClassifier.load_or_train(config.data.data_dir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        # The last logged window's mean; each variant's own loss (weighting, target).
        final_loss = [r["loss"] for r in map(json.loads, f) if "loss" in r][-1]
      restored = builders.restore_ema(config, workdir)  # once for all settings
      for setting in args.settings.split(","):
        row = dict(variant=name, overrides=list(VARIANTS[name]), train_seed=seed,
                   train_seconds=round(train_seconds, 1), final_loss=float(final_loss),
                   num_samples=args.num_samples, sample_seed=args.seed,
                   devices=jax.device_count(), **_score(args, clf, config, restored, setting))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
