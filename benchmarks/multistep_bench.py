"""Several train steps per device call (a lax.scan over k batches) vs one per call.

Issue 10 asks for k steps per call "kept only if the benchmark shows it pays":
on a small model a Python loop of jitted steps may be bound by dispatch, which
one call of k scanned steps would amortise. This measures both on the same
train step (`train.train_step_fn`) and batch, in one process, and prints one
JSON line per k with the time per step and its ratio to k = 1.

  python benchmarks/multistep_bench.py --config=configs/digits.py --ks=1,4,16
"""
import argparse
import importlib
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import builders, models, optim, parallel, train, xla_flags


def _setup(config_path: str, batch: int = 0, dtype: str = ""):
  name = os.path.splitext(os.path.basename(config_path))[0]
  config = importlib.import_module(f"configs.{name}").get_config()
  if batch:
    config.training.batch_size = batch
  if dtype:
    config.model.dtype = dtype
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  step_fn = train.train_step_fn(model, builders.make_schedule(config), tx, config)
  b, s, c = config.training.batch_size, config.data.image_size, config.data.channels
  batch = {"image": np.random.default_rng(0).uniform(-1, 1, (b, s, s, c)).astype(np.float32),
           "label": np.zeros((b,), np.int32)}
  return config, model, tx, mesh, step_fn, batch


def time_per_step(k: int, config, model, tx, mesh, step_fn, batch, calls: int) -> float:
  """Median seconds per train step over `calls` calls of k steps each."""
  if k == 1:
    fn = jax.jit(step_fn, donate_argnums=(0,))
    args = parallel.to_global(batch, mesh)
  else:
    def multi(state, batches, key):
      return jax.lax.scan(lambda st, bt: step_fn(st, bt, key), state, batches)
    fn = jax.jit(multi, donate_argnums=(0,))
    args = jax.tree.map(lambda a: np.stack([a] * k), batch)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  key = jax.random.key(1)
  state, _ = fn(state, args, key)  # compile
  jax.block_until_ready(state)
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    state, _ = fn(state, args, key)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - start) / k)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--ks", default="1,4,16")
  parser.add_argument("--steps", type=int, default=64, help="train steps timed per k")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  parser.add_argument("--dtype", default="", help="the model's compute dtype (default: the "
                      "config's), e.g. bfloat16")
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  setup = _setup(args.config, args.batch, args.dtype)
  base = None
  for k in (int(x) for x in args.ks.split(",")):
    per_step = time_per_step(k, *setup, calls=max(3, args.steps // k))
    base = base or per_step
    print(json.dumps(dict(bench="steps_per_call", config=args.config, k=k,
                          batch=setup[0].training.batch_size,
                          dtype=setup[0].model.dtype, backend=jax.default_backend(),
                          devices=jax.device_count(), ms_per_step=round(per_step * 1e3, 2),
                          ratio_to_k1=round(per_step / base, 3))), flush=True)


if __name__ == "__main__":
  main()
