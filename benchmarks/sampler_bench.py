"""Sampler speed: images/s and compile time of each sampler, per batch size.

For each (method, network evaluations) in ancestral 1000, DDIM 50 and
DPM-Solver++ 20, and each batch size, prints one JSON line: the compile time
of the whole reverse process (one jitted `lax.scan`, batch split over all
devices), the median wall time of `--repeats` calls after compilation and
images/s. The network has random weights: speed does not depend on them.

  python benchmarks/sampler_bench.py                          # digits model
  python benchmarks/sampler_bench.py --which=cifar10 --batch_sizes=256
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar10, digits
from diffusion_jax import models, parallel, samplers, schedules, xla_flags

METHODS = (("ancestral", 1000), ("ddim", 50), ("dpm_solver++", 20))


def _sampler(config, mesh, method, num_steps, batch):
  model = models.create_model(config.model, config.data.channels)
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  data = parallel.data_sharded(mesh)

  def fn(params, rng):
    def denoise_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, data)
      return model.apply({"params": params}, x, t, None, train=False)
    return samplers.sample(denoise_fn, schedule, shape, rng, method=method,
                           num_steps=num_steps)

  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape[1:]),
                                      jnp.zeros((1,), jnp.int32), None, train=False)["params"],
                   out_shardings=parallel.replicated(mesh))()
  return jax.jit(fn, out_shardings=data), params


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--which", default="digits", choices=["digits", "cifar10"])
  parser.add_argument("--batch_sizes", default="64,256")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--methods", default="ancestral,ddim,dpm_solver++")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the network's compute dtype (parameters stay float32)")
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  config = (digits if args.which == "digits" else cifar10).get_config()
  config.model.dtype = args.dtype
  mesh = parallel.make_mesh()
  wanted = args.methods.split(",")
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    for method, steps in METHODS:
      if method not in wanted:
        continue
      fn, params = _sampler(config, mesh, method, steps, batch)
      start = time.perf_counter()
      compiled = fn.lower(params, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - start
      times = []
      for i in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(i)))
        times.append(time.perf_counter() - start)
      sec = statistics.median(times)
      print(json.dumps(dict(
          bench="sampler", model=args.which, dtype=args.dtype, method=method,
          network_evals=steps, batch=batch, devices=mesh.devices.size,
          backend=jax.default_backend(),
          compile_s=round(compile_s, 2), seconds=round(sec, 3),
          images_per_s=round(batch / sec, 2))), flush=True)


if __name__ == "__main__":
  main()
