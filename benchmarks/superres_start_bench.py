"""Which sampling steps lose an upsampler's quality? DDIM started part-way down.

For each t_start, noises the real high-resolution test images to x_{t_start}
by q(x_t | x_0) and runs deterministic DDIM (the 50-step grid's steps at or
below t_start; the row's `t_start_grid` is the first of them) to x_0, with and
without static thresholding; t_start = T-1 starts from pure noise instead, as
real sampling does. (`samplers.sample` always starts from pure noise, hence the
loop here, the same update as its DDIM step at eta = 0.) PSNR against the real
images then shows whether quality is lost in the noisiest steps (where an
eps model's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is ill-conditioned)
or all along. One JSON line per t_start.

  python benchmarks/superres_start_bench.py --workdir=workdir/sr32 --starts=999,950,600
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
# pylint: disable=g-import-not-at-top,wrong-import-position
import superres_bench
from configs import from_workdir
from diffusion_jax import builders, diffusion, run_logging, samplers, xla_flags
from diffusion_jax.conditioning import low_res
from diffusion_jax.evaluation import image_metrics


def ddim_from(denoise, schedule, prediction, x0_true, t_start, num_steps, clip, rng):
  """Deterministic DDIM from q(x_{t_start} | x0_true) (pure noise at T-1) to x_0."""
  ts = samplers.spaced_timesteps(schedule.num_timesteps, num_steps)
  ts = ts[ts <= t_start]
  if not len(ts):
    raise ValueError(f"t_start={t_start} is below the grid's first step (0).")
  noise = jax.random.normal(rng, x0_true.shape)
  if t_start >= schedule.num_timesteps - 1:
    x = noise
  else:
    x = diffusion.q_sample(schedule, x0_true, jnp.full((len(x0_true),), ts[-1]), noise)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  for i in range(len(ts) - 1, -1, -1):
    a, a_prev = abar[ts[i]], (abar[ts[i - 1]] if i > 0 else 1.0)
    out = denoise(x, jnp.full((len(x),), ts[i], jnp.int32))
    x0, _ = diffusion.model_output_to_x0_eps(a, x, out, prediction)
    x0 = jnp.clip(x0, -1.0, 1.0) if clip else x0
    eps = diffusion.eps_from_x0(a, x, x0)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps
  return run_logging.to_uint8(np.asarray(jnp.clip(x, -1.0, 1.0))), int(ts[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--starts", default="999,950,900,800,600,300")
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=50)
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  config = from_workdir.get_config(args.workdir)
  high, low = superres_bench.test_pairs(config, args.num_images)
  model, params, step, _ = builders.restore_ema(config, args.workdir)
  schedule = builders.make_schedule(config)
  cond = low_res.sample_low_res_cond(config, schedule, jnp.asarray(low), jax.random.key(1))
  denoise = jax.jit(lambda x, t: model.apply({"params": params}, x, t, cond, train=False))
  x0_true = jnp.asarray(high, jnp.float32) / 127.5 - 1.0
  for t_start in (int(s) for s in args.starts.split(",")):
    row = dict(bench="superres_start", workdir=args.workdir, step=step,
               prediction=config.diffusion.prediction, t_start=t_start,
               sampler=f"ddim{args.num_steps}", num_images=len(high))
    for clip in (True, False):
      fake, row["t_start_grid"] = ddim_from(denoise, schedule, config.diffusion.prediction,
                                            x0_true, t_start, args.num_steps, clip,
                                            jax.random.key(0))
      row["psnr_clip" if clip else "psnr_noclip"] = round(
          float(np.mean(image_metrics.psnr(fake, high))), 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
