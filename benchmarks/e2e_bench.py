"""End to end: start-up time and how much the training loop loses to the step.

Prints JSON lines for a config (default configs/digits.py, 1 process):
  * "startup": wall time of `main.py` for a 1-step run (start-up, data, init,
    compile, one step, checkpoint, exit), with a cold and then a warm
    persistent compilation cache, and with the cache off;
  * "loop_vs_step": steps/s of the whole loop (from metrics.jsonl, windows
    after the first, so compilation is excluded) against the jitted train
    step alone on one fixed batch in this process; their ratio is what input,
    logging and checkpointing cost.

  python benchmarks/e2e_bench.py --steps=400
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(workdir, config, steps, cache_dir, extra=()):
  cmd = [sys.executable, "-m", "diffusion_jax.main", f"--config={config}",
         f"--workdir={workdir}", f"--compilation_cache_dir={cache_dir}",
         f"--config.training.num_train_steps={steps}",
         "--config.training.sample_every_steps=0", *extra]
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  return time.perf_counter() - start


def step_alone_rate(config_path: str, steps: int) -> float:
  """Steps/s of the jitted train step alone, in this process."""
  sys.path.insert(0, ROOT)
  from diffusion_jax import builders, models, optim, parallel, train, xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply_defaults()  # as main.py does, before the first computation
  import importlib  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(config_path))[0]
  config = importlib.import_module(f"configs.{name}").get_config()
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, config.data.channels)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  step = train.make_train_step(model, builders.make_schedule(config), tx, config, mesh)
  b = config.training.batch_size
  s = config.data.image_size
  batch = parallel.to_global({
      "image": np.random.uniform(-1, 1, (b, s, s, config.data.channels)).astype(np.float32),
      "label": np.zeros((b,), np.int32)}, mesh)
  key = jax.random.key(1)
  state, _ = step(state, batch, key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch, key)
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--steps", type=int, default=400)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    for label, cache_dir in (("cache_off", "none"), ("cache_cold", cache), ("cache_warm", cache)):
      wall = _run_main(os.path.join(tmp, label), args.config, 1, cache_dir)
      print(json.dumps(dict(bench="startup", config=args.config, cache=label,
                            wall_s_one_step_run=round(wall, 2))), flush=True)
    log_every = args.steps // 4
    workdir = os.path.join(tmp, "loop")
    _run_main(workdir, args.config, args.steps, cache,
              [f"--config.training.log_every_steps={log_every}",
               f"--config.training.checkpoint_every_steps={args.steps}"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    loop = statistics.median(r["steps_per_sec"] for r in rows[1:])
  alone = step_alone_rate(args.config, 100)
  print(json.dumps(dict(bench="loop_vs_step", config=args.config, devices=jax.device_count(),
                        loop_steps_per_s=round(loop, 2), step_alone_steps_per_s=round(alone, 2),
                        loop_fraction_of_step=round(loop / alone, 3))), flush=True)


if __name__ == "__main__":
  main()
