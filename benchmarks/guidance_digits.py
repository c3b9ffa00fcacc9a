"""Classifier-free guidance on digits: class accuracy and Frechet distance per scale.

Restores the EMA parameters of a `configs/digits_cond.py` run, draws the same
number of samples of every class at each guidance scale (one guided sampler,
compiled once: the scale is a runtime value), and scores them with the digits
classifier of `diffusion_jax/evaluation` (trained on the real train split):

  class_accuracy   fraction the classifier assigns to the requested class
  frechet_distance between classifier features of the samples and of the
                   real test digits (`digits_quality`; lower is better), with
                   floor_frechet_distance (as many real train digits as
                   samples) and frechet_distance_ratio, the first over the second

Prints one JSON line per scale.

  python -m diffusion_jax.main --config=configs/digits_cond.py --workdir=/tmp/digits_cond
  python benchmarks/guidance_digits.py --workdir=/tmp/digits_cond --scales=1,2,3,5
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import builders, checkpointing, generation, guidance, xla_flags
from diffusion_jax.evaluation import digits_classifier, digits_quality


def _score(images: np.ndarray, labels: np.ndarray, clf, data_dir: str) -> dict:
  """digits_quality's scalar figures (FD, its same-n floor and ratio) and class accuracy."""
  q = digits_quality.digits_quality(images, clf, data_dir, labels=labels)
  out = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in q.items()
         if np.isscalar(v)}
  hit = clf.predict_proba(images).argmax(1) == labels
  out["worst_class_accuracy"] = float(min(hit[labels == c].mean() for c in np.unique(labels)))
  hist = q["class_histogram"]
  out["min_class_share"], out["max_class_share"] = min(hist), max(hist)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A configs/digits_cond.py run.")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data_dir of the real digits ('' = the run's).")
  parser.add_argument("--scales", default="1,2,3,5")
  parser.add_argument("--per_class", type=int, default=100, help="Samples per class.")
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--method", default="", help="sampler ('' = the run's sample.method)")
  parser.add_argument("--num_steps", type=int, default=0, help="0 = the run's")
  parser.add_argument("--variance", default="", help="ancestral variance ('' = the run's)")
  parser.add_argument("--thresholding", default="", help="'' = the run's")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation

  config = checkpointing.load_config(args.workdir)
  s = config.sample
  s.method = args.method or s.method
  s.num_steps = args.num_steps or s.num_steps
  s.variance = args.variance or s.variance
  s.thresholding = args.thresholding or s.thresholding
  model, params, step, mesh = builders.restore_ema(config, args.workdir)
  data_dir = args.data_dir or config.data.data_dir
  clf = digits_classifier.DigitsClassifier.load_or_train(data_dir)
  k = config.model.num_classes
  n = k * args.per_class
  labels = guidance.parse_labels("all", k, n)
  fn = generation.make_sample_fn(model, builders.make_schedule(config), config, args.batch_size,
                             mesh, guided=not config.model.guidance_embed)
  for scale in (float(s) for s in args.scales.split(",")):
    start = time.perf_counter()
    # The same seed at every scale: the same x_T, so only the guidance differs.
    images = generation.generate(fn, params, n, args.batch_size, args.seed,
                                 cond={"label": labels}, guidance_scale=scale)
    seconds = time.perf_counter() - start
    row = dict(benchmark="guidance_digits", guidance_scale=scale, step=step,
               num_samples=n, method=s.method, num_steps=s.num_steps, variance=s.variance,
               thresholding=s.thresholding, sample_seconds=round(seconds, 1),
               compiles=fn.jitted._cache_size())
    row.update(_score(images, labels, clf, data_dir))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
