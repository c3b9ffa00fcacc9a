"""Caption faithfulness on the offline `shapes` set, per guidance scale.

Restores the EMA parameters of a text-conditioned run (configs/shapes_text_*.py,
or the last stage of a cascade), samples the captions of the test split, seen
and held-out (colour, shape) combinations in equal numbers, and scores every
image against its caption with the exact checker of
`diffusion_jax/evaluation/shapes_checker.py` (no learned classifier: it decodes
count, shape, colour, size and relation from the pixels; 100% on real images).

Prints one JSON line per (workdir, scale): per-attribute accuracy and caption
accuracy (every attribute right), for seen and held-out combinations.

  python benchmarks/caption_bench.py --workdirs=workdir/glide,workdir/frozen --scales=1,3,5
  python benchmarks/caption_bench.py --cascade=BASE_DIR,SR_DIR --scales=3
"""
import argparse
import json
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cascade as cascade_config
from configs import from_workdir
from diffusion_jax import builders, cascade, generation, xla_flags
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import shapes_checker


def test_captions(per_subset: int) -> tuple[list[str], np.ndarray]:
  """The first `per_subset` seen and held-out captions of the test split."""
  test = shapes.make_split("test")
  seen = [e["caption"] for e in test if not e["held_out"]][:per_subset]
  held = [e["caption"] for e in test if e["held_out"]][:per_subset]
  return seen + held, np.array([False] * len(seen) + [True] * len(held))


def sample_single(workdir: str, captions: list[str], scale: float, batch: int, seed: int,
                  num_steps: int, step: Optional[int] = None) -> tuple[np.ndarray, int]:
  """uint8 [N, 32, 32, 3] from one text-conditioned run (its checkpoint at `step`,
  default the latest) at a guidance scale."""
  config = from_workdir.get_config(workdir)
  config.sample.num_steps = num_steps
  model, params, step, mesh = builders.restore_ema(config, workdir, step)
  conditioning = Conditioning(config)
  fn = generation.make_sample_fn(model, builders.make_schedule(config), config, batch, mesh,
                                 guided=True, conditioning=conditioning)
  images = generation.generate(fn, params, len(captions), batch, seed, 0.0,
                               guidance_scale=scale,
                               cond=conditioning.request(len(captions), captions=captions).cond)
  return images, step


def sample_cascade(workdirs: str, captions: list[str], scale: float, batch: int,
                   seed: int, num_steps: int) -> np.ndarray:
  """The last stage's uint8 samples of a cascade, every stage at this scale."""
  config = cascade_config.get_config(workdirs)
  with open(os.path.join(tempfile.mkdtemp(), "captions.txt"), "w") as f:
    f.write("\n".join(captions))
  c = config.cascade
  c.num_samples, c.batch_size, c.seed, c.name = len(captions), batch, seed, "bench"
  c.captions = "@" + f.name
  for stage in cascade.stages(config):
    stage.sample.num_steps = num_steps
    if Conditioning(stage).guidable:
      stage.sample.guidance_scale = scale
  paths = cascade.sample_cascade(config, tempfile.mkdtemp())
  return np.load(paths[-1])["arr_0"]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdirs", default="", help="text-conditioned runs, comma-separated")
  parser.add_argument("--cascade", default="", help="a cascade's stage workdirs, base first")
  parser.add_argument("--scales", default="1,3,5")
  parser.add_argument("--per_subset", type=int, default=128)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--num_steps", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of the --workdirs runs (default: latest)")
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  captions, held_out = test_captions(args.per_subset)
  runs = [("single", w) for w in args.workdirs.split(",") if w]
  if args.cascade:
    runs.append(("cascade", args.cascade))
  for kind, target in runs:
    for scale in (float(s) for s in args.scales.split(",")):
      start = time.perf_counter()
      if kind == "single":
        images, step = sample_single(target, captions, scale, args.batch, args.seed,
                                     args.num_steps, args.step)
      else:
        images, step = sample_cascade(target, captions, scale, args.batch, args.seed,
                                      args.num_steps), None
      scores = shapes_checker.score_subsets(images, captions, held_out)
      print(json.dumps(dict(
          bench="caption_accuracy", kind=kind, workdir=target, step=step, scale=scale,
          sampler=f"ddim{args.num_steps}", num_samples=len(captions),
          seconds=round(time.perf_counter() - start, 1),
          **{f"{sub}_{k}": round(v, 4) for sub, d in scores.items() for k, v in d.items()})),
            flush=True)


if __name__ == "__main__":
  main()
