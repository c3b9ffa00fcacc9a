"""Offline sample quality of a digits checkpoint, per sampler: one JSON line each.

Restores the EMA parameters of a digits run (the README's default command:
`configs/digits.py`, 4,000 steps), draws `--num_samples` images with each
sampler setting and scores them with `evaluation/digits_quality.py`: a
Frechet distance in a digits classifier's feature space against the 300 real
TEST digits, beside the floor (the same distance from as many real TRAIN
digits as there are samples, the mean of 10 draws) and their ratio; the
fraction of confidently classified samples, the class histogram and
precision/recall (with the same-n floors). Sampling does not write into the
workdir.

  python benchmarks/digits_quality.py --workdir=workdir/digits --num_samples=1000
  python benchmarks/digits_quality.py --workdir=workdir/digits \
      --settings=ddim:50,ancestral:100:variance=fixed_small --save_dir=/tmp/digits_samples
  python benchmarks/digits_quality.py --workdir=workdir/digits \
      --npz=workdir/digits/samples/<name>.npz   # score sample mode's output
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import builders, checkpointing, generation, xla_flags
from diffusion_jax.evaluation import digits_classifier, digits_quality, npz_io

DEFAULT_SETTINGS = ("ancestral:1000,ddim:10,ddim:20,ddim:50,"
                    "dpm_solver++:10,dpm_solver++:20,dpm_solver++:50")


def parse_setting(setting: str) -> tuple[str, int, dict]:
  """'method:steps[:key=value+key=value]' -> (method, steps, sample-config overrides).

  The optional third field sets other `config.sample` fields, e.g.
  "ddim:50:eta=1" or "ancestral:100:variance=fixed_small".
  """
  parts = setting.split(":")
  if len(parts) not in (2, 3):
    raise ValueError(f"a setting is method:steps[:key=value+...], got {setting!r}")
  extra = {}
  for item in (parts[2].split("+") if len(parts) == 3 else ()):
    key, value = item.split("=")
    extra[key] = float(value) if key in ("eta", "dynamic_threshold_percentile") else value
  return parts[0], int(parts[1]), extra


def setting_name(setting: str) -> str:
  return setting.replace(":", "").replace("=", "").replace("+", "_")


def make_sampler(model, config, mesh, setting: str, args):
  """The compiled-on-first-call sampler of one setting and its DDIM eta."""
  config = config.copy_and_resolve_references()
  method, num_steps, extra = parse_setting(setting)
  config.sample.method, config.sample.num_steps = method, num_steps
  for key, value in extra.items():
    config.sample[key] = value
  sample_fn = generation.make_sample_fn(model, builders.make_schedule(config), config,
                                        args.batch_size, mesh)
  return sample_fn, config.sample.eta


def draw(model, params, config, mesh, setting: str, args, sampler=None) -> np.ndarray:
  """uint8 [num_samples, H, W, C] of one setting; `sampler` (from `make_sampler`)
  reuses a compiled sampler, so a second draw times sampling alone."""
  sample_fn, eta = sampler or make_sampler(model, config, mesh, setting, args)
  return generation.generate(sample_fn, params, args.num_samples, args.batch_size, args.seed,
                             eta)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a digits training run")
  parser.add_argument("--npz", default="",
                      help="score this samples file (e.g. the README's sample-mode output, "
                           "<workdir>/samples/*.npz) instead of sampling")
  parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                      help="comma-separated method:steps[:key=value+...]")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = latest")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir of the real digits (default: the run's)")
  parser.add_argument("--save_dir", default="", help="also write each sample set (.npz)")
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation

  config = checkpointing.load_config(args.workdir)
  data_dir = config.data.data_dir if args.data_dir is None else args.data_dir
  clf = digits_classifier.DigitsClassifier.load_or_train(data_dir)
  if args.npz:
    images, labels = npz_io.read_samples(args.npz)
    quality = digits_quality.digits_quality(images, clf, data_dir, labels=labels)
    print(json.dumps({"npz": args.npz, **quality}), flush=True)
    return
  model, params, step, mesh = builders.restore_ema(config, args.workdir, args.step)
  for setting in args.settings.split(","):
    method, num_steps, extra = parse_setting(setting)
    start = time.perf_counter()
    images = draw(model, params, config, mesh, setting, args)
    seconds = time.perf_counter() - start
    if args.save_dir:
      npz_io.write_samples(os.path.join(args.save_dir, setting_name(setting) + ".npz"),
                           images)
    quality = digits_quality.digits_quality(images, clf, data_dir)
    print(json.dumps({"method": method, "num_steps": num_steps, **extra,
                      "checkpoint_step": step,
                      "num_samples": args.num_samples, "seed": args.seed,
                      "sampling_seconds": round(seconds, 1),
                      "devices": jax.device_count(), **quality}), flush=True)


if __name__ == "__main__":
  main()
