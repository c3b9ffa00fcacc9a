"""An upsampler alone: PSNR and SSIM against the real high-resolution test images.

For each super-resolution workdir (e.g. configs/shapes_sr32.py trained with and
without noise-conditioning augmentation), feeds the real low-resolution test
images (the input pipeline's anti-aliased downsampling) to the upsampler,
samples, and compares with the real high-resolution images. Also prints the
same metrics for plain bicubic and bilinear upsampling, the floor any learned
upsampler should beat. One JSON line per (workdir, sampling level).

  python benchmarks/superres_bench.py --workdirs=workdir/sr32,workdir/sr32_noaug \
      --levels=0,0.2 --num_images=256
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import from_workdir
from diffusion_jax import builders, generation, input_pipeline, run_logging
from diffusion_jax import superres, xla_flags
from diffusion_jax.evaluation import image_metrics


def test_pairs(config, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """(high uint8 [N, S, S, C], low float32 [N, s, s, C] in [-1, 1]) of the eval split."""
  highs, lows, n = [], [], 0
  for batch in input_pipeline.create_eval_iterator(config.data, 64):
    keep = batch["mask"]
    highs.append(run_logging.to_uint8(batch["image"][keep]))
    lows.append(batch["low_res"][keep])
    n += int(keep.sum())
    if n >= num_images:
      break
  return np.concatenate(highs)[:num_images], np.concatenate(lows)[:num_images]


def _scores(name: str, fake: np.ndarray, real: np.ndarray, **extra) -> dict:
  return dict(bench="superres", method=name, num_images=len(real),
              psnr=round(float(np.mean(image_metrics.psnr(fake, real))), 3),
              ssim=round(float(np.mean(image_metrics.ssim(fake, real))), 4), **extra)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdirs", required=True)
  parser.add_argument("--levels", default="0,0.2", help="sampling aug levels (fractions)")
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--num_steps", type=int, default=50)
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  workdirs = args.workdirs.split(",")
  config = from_workdir.get_config(workdirs[0])
  high, low = test_pairs(config, args.num_images)
  size = config.data.image_size
  for method in ("bilinear", "bicubic"):
    up = run_logging.to_uint8(np.asarray(superres.upsample(low, size, method)).clip(-1, 1))
    print(json.dumps(_scores(method, up, high)), flush=True)
  for workdir in workdirs:
    config = from_workdir.get_config(workdir)
    config.sample.num_steps = args.num_steps
    model, params, step, mesh = builders.restore_ema(config, workdir)
    for level in (float(x) for x in args.levels.split(",")):
      config.superres.sample_aug_level = level
      fn = generation.make_sample_fn(model, builders.make_schedule(config), config, args.batch,
                                     mesh)
      start = time.perf_counter()
      fake = generation.generate(fn, params, len(low), args.batch, 0, 0.0, cond={"low_res": low})
      print(json.dumps(_scores(
          "diffusion", fake, high, workdir=workdir, step=step,
          trained_noise_aug_max=config.superres.noise_aug_max, sample_aug_level=level,
          sampler=f"ddim{args.num_steps}", seconds=round(time.perf_counter() - start, 1),
          devices=jax.device_count())), flush=True)


if __name__ == "__main__":
  main()
