"""XLA:CPU's YNNPACK fusions on and off: matmul, forward and train step, one process.

XLA:CPU (jaxlib 0.10) hands convolutions, dots, elementwise ops and reductions
to YNNPACK fusions by default; `diffusion_jax.xla_flags` turns them all off
(`--xla_cpu_experimental_ynn_fusion_type=-dot,...`). This script measures why:
it compiles the same functions under each variant with per-compile options (the
process's own XLA_FLAGS are the baseline, so run it without ours), then times
them in interleaved rounds (A, B, C, A, B, C, ...) so that a noisy machine
slows every variant alike. Prints one JSON line per variant and function, with
`speedup` against the first variant, and `matmul_fraction` against the best
matmul rate of the run.

  python benchmarks/cpu_backend_bench.py --which=tiny --rounds=15
  python benchmarks/cpu_backend_bench.py --which=cifar10 --rounds=5
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import model_bench

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# name -> per-compile XLA options, in the enum spelling compile() accepts (in
# XLA_FLAGS: `dot`, and `-dot,-individual_dot,...` for none). INVALID names the
# empty set; XLA logs "Unsupported fusion type: 0" for it, harmlessly.
VARIANTS = {
    "xla_default": {},
    "ynn_dot_only": {_YNN: "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_off": {_YNN: "LIBRARY_FUSION_TYPE_INVALID"},
}


def _compiled(fn, args, options: dict):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
  return compiled, time.perf_counter() - start


def _interleaved(calls: dict, rounds: int, per_round: int) -> dict[str, float]:
  """name -> median seconds per call, timing the variants in turn each round."""
  times = {name: [] for name in calls}
  for fn in calls.values():
    jax.block_until_ready(fn())
  for _ in range(rounds):
    for name, fn in calls.items():
      for _ in range(per_round):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _functions(which: str):
  """(name, fn, args) for the model's forward pass and train step."""
  model_config, shape = model_bench._models("float32", False)[which]  # pylint: disable=protected-access
  model, x, t, params = model_bench.setup(model_config, shape)
  tx = optax.adam(2e-4)
  step = model_bench._train_step_fn(model, tx)  # pylint: disable=protected-access
  fwd = lambda p, x, t: model.apply({"params": p}, x, t, train=False)
  return shape[0], [("forward", fwd, (params, x, t)),
                    ("train_step", step, (params, tx.init(params), x, jax.random.key(1)))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--which", choices=("tiny", "cifar10"), default="tiny")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--matmul_n", type=int, default=2048)
  args = parser.parse_args()
  print(json.dumps({"bench": "env", "jax": jax.__version__, "backend": jax.default_backend(),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
  n = args.matmul_n
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = {v: _compiled(jnp.dot, (a, a), o)[0] for v, o in VARIANTS.items()}
  mm_s = _interleaved({v: (lambda c=c: c(a, a)) for v, c in mm.items()}, args.rounds, 3)
  rates = {v: 2 * n**3 / s for v, s in mm_s.items()}
  peak = max(rates.values())
  for v, r in rates.items():
    print(json.dumps({"bench": "matmul", "variant": v, "n": n,
                      "gflop_per_s": round(r / 1e9, 2)}), flush=True)
  batch, functions = _functions(args.which)
  for phase, fn, fargs in functions:
    compiled = {v: _compiled(fn, fargs, o) for v, o in VARIANTS.items()}
    per_round = 1 if args.which == "cifar10" else 5
    secs = _interleaved({v: (lambda c=c: c[0](*fargs)) for v, c in compiled.items()},
                        args.rounds, per_round)
    base = secs[next(iter(VARIANTS))]
    for v, (c, compile_s) in compiled.items():
      flops = model_bench._flops(c)  # pylint: disable=protected-access
      print(json.dumps({"bench": "cpu_backend", "model": args.which, "phase": phase,
                        "variant": v, "batch": batch, "ms": round(1e3 * secs[v], 2),
                        "speedup": round(base / secs[v], 3), "gflop": round(flops / 1e9, 3),
                        "matmul_fraction": round(flops / secs[v] / peak, 3),
                        "compile_s": round(compile_s, 2)}), flush=True)


if __name__ == "__main__":
  main()
