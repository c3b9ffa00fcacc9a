"""U-Net speed: forward and train-step time, images/s, XLA FLOPs, share of matmul peak.

Prints one JSON line per measurement: first the matmul rate of this machine in the
compute dtype (a square `jnp.dot`; float32, or bf16 with `--dtype=bfloat16`), then
for each model a "forward" line (train=False, as a sampler calls it) and a
"train_step" line (eps-prediction MSE, forward + backward + Adam via optax, dropout
on). Times are medians of `--steps` calls after a warm-up call, each ended with
`block_until_ready` and followed by one call of the matmul, whose median rate over
the same minutes is the line's `matmul_gflop_per_s`; FLOPs are XLA's own count for
the lowered function (`Lowered.cost_analysis()`), so `matmul_fraction` = achieved FLOP/s
over that matmul FLOP/s. Where the backend reports memory (GPU, TPU), each line
also has the device's peak bytes in use so far in the process
(`peak_mem_gib_so_far`: run one model and batch per process for a clean figure; the
train step does not donate its inputs, so it holds two copies of params and Adam state).

  python benchmarks/model_bench.py                 # both models
  python benchmarks/model_bench.py --which=tiny --steps=20
  python benchmarks/model_bench.py --which=cifar10 --dtype=bfloat16 --batches=128,512

With `--batches` in increasing order, a batch that runs out of device memory prints
an "out_of_memory" line and ends that model's list (benchmarks/gpu_run.sh uses this
to find the largest batch that fits).
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default
from diffusion_jax.models import create_model
from diffusion_jax import xla_flags

# The DDPM CIFAR-10 network (Ho et al. 2020, appendix B).
CIFAR10_MODEL = dict(name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attn_resolutions=(16,), dropout=0.1, patch_size=1)


def _models(dtype: str, remat: bool) -> dict[str, tuple[dict, tuple[int, ...]]]:
  """name -> (model config, [B, H, W, C] input shape at the default batch)."""
  tiny = dict(default.get_config().model)
  extra = dict(dtype=dtype, remat=remat)
  return {"cifar10": ({**CIFAR10_MODEL, **extra}, (8, 32, 32, 3)),
          "tiny": ({**tiny, **extra}, (64, 16, 16, 1))}


def _peak_mem_gib() -> dict:
  """{'peak_mem_gib_so_far': ...} where the backend reports memory (not XLA:CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return {}
  return {"peak_mem_gib_so_far": round(stats["peak_bytes_in_use"] / 2**30, 2)}


def _time(fn: Callable[[], Any], steps: int,
          matmul: Callable[[], Any] | None = None) -> tuple[float, float]:
  """Median wall times (s) of `steps` calls of `fn` and of `matmul`, alternated.

  Each call of `fn` is followed by one of `matmul` (if given), so both medians
  cover the same minutes: on a shared machine whose speed drifts, their ratio
  stays meaningful where a matmul rate measured once at the start would not.
  """
  jax.block_until_ready(fn())
  times, mm_times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    if matmul is not None:
      start = time.perf_counter()
      jax.block_until_ready(matmul())
      mm_times.append(time.perf_counter() - start)
  return statistics.median(times), statistics.median(mm_times) if mm_times else float("nan")


def _flops(lowered) -> float:
  """XLA's FLOP count of the HLO as lowered, before the backend rewrites it.

  The compiled module's count is not used: XLA:GPU turns convolutions into cuDNN
  custom calls that its cost analysis does not count (on an H200 it gave 0.41
  GFLOP per CIFAR-10 forward image instead of 11.7).
  """
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


class Matmul:
  """An n x n matmul in `dtype` on the default device: the reference rate."""

  def __init__(self, n: int, dtype: str = "float32"):
    self.n, self.dtype = n, dtype
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    self.call = lambda: dot(a, b)
    self.alone = float("nan")  # the rate measured by report(), alone

  def rate(self, seconds: float) -> float:
    return 2 * self.n**3 / seconds

  def report(self, steps: int) -> None:
    """Prints the rate measured alone (later lines have their own, alternated)."""
    seconds, _ = _time(self.call, steps)
    self.alone = self.rate(seconds)
    print(json.dumps({"bench": "matmul", "dtype": self.dtype, "n": self.n,
                      "ms": round(1e3 * seconds, 3),
                      "gflop_per_s": round(self.alone / 1e9, 2)}), flush=True)


def _train_step_fn(model, tx):
  """One DDPM-style step: eps-MSE at random t in [0, 1000), then an Adam update."""
  def step(params, opt_state, x, key):
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (x.shape[0],), 0, 1000)
    eps = jax.random.normal(k_eps, x.shape)
    abar = jnp.cos(t / 1000 * jnp.pi / 2)[:, None, None, None] ** 2  # any schedule will do
    x_t = jnp.sqrt(abar) * x + jnp.sqrt(1 - abar) * eps

    def loss_fn(p):
      out = model.apply({"params": p}, x_t, t, train=True, rngs={"dropout": k_drop})
      return jnp.mean((out - eps) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def setup(model_config: dict, shape: tuple[int, ...]):
  """(model, x [B, H, W, C] in [-1, 1], t [B], params) for one model and batch."""
  model = create_model(model_config, out_channels=shape[-1])
  x = jax.random.uniform(jax.random.key(0), shape, minval=-1.0, maxval=1.0)
  t = jnp.arange(shape[0], dtype=jnp.int32) * 100
  params = jax.jit(lambda k: model.init(k, x, t, train=False))(jax.random.key(0))["params"]
  return model, x, t, jax.block_until_ready(params)


def bench_model(name: str, model_config: dict, shape: tuple[int, ...], steps: int,
                matmul: Matmul) -> None:
  """Prints the forward and train-step lines for one model."""
  start = time.perf_counter()
  model, x, t, params = setup(model_config, shape)
  init_s = time.perf_counter() - start
  n_params = sum(p.size for p in jax.tree.leaves(params))
  common = {"model": name, "batch": shape[0], "image": list(shape[1:]), "params": n_params,
            "dtype": model_config["dtype"], "remat": model_config["remat"]}

  fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
  start = time.perf_counter()
  fwd_l = fwd.lower(params, x, t)
  fwd_c = fwd_l.compile()
  compile_s = time.perf_counter() - start
  seconds, mm_s = _time(lambda: fwd_c(params, x, t), steps, matmul.call)
  _report(common, "forward", seconds, _flops(fwd_l), compile_s, matmul.rate(mm_s),
          matmul.alone, init_s=round(init_s, 2))

  tx = optax.adam(2e-4)
  opt_state = tx.init(params)
  step = jax.jit(_train_step_fn(model, tx))
  key = jax.random.key(1)
  start = time.perf_counter()
  step_l = step.lower(params, opt_state, x, key)
  step_c = step_l.compile()
  compile_s = time.perf_counter() - start
  # Not donating: the same params are fed each call so every call does equal work.
  seconds, mm_s = _time(lambda: step_c(params, opt_state, x, key), steps, matmul.call)
  _report(common, "train_step", seconds, _flops(step_l), compile_s, matmul.rate(mm_s),
          matmul.alone)


def _report(common: dict, phase: str, seconds: float, flops: float, compile_s: float,
            peak: float, alone: float, **extra) -> None:
  rate = flops / seconds
  print(json.dumps({**common, "phase": phase, "ms": round(1e3 * seconds, 2),
                    "images_per_s": round(common["batch"] / seconds, 2),
                    "gflop": round(flops / 1e9, 3), "gflop_per_s": round(rate / 1e9, 2),
                    "matmul_gflop_per_s": round(peak / 1e9, 2),
                    "matmul_fraction": round(rate / peak, 3),
                    # Against the rate measured alone at the start: after a large
                    # step the alternated matmul can run slower (buffers freed
                    # meanwhile?), so both are shown.
                    "matmul_fraction_vs_alone": round(rate / alone, 3),
                    "compile_s": round(compile_s, 2), **extra, **_peak_mem_gib()}),
        flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--which", choices=("all", "cifar10", "tiny"), default="all")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--remat", action="store_true", help="rematerialise each block")
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--batches", default="", help="batch sizes, e.g. 128,512 "
                      "(default: 8 for cifar10, 64 for tiny)")
  args = parser.parse_args()
  xla_flags.apply_defaults()  # before the first computation
  device = jax.devices()[0]
  print(json.dumps({"bench": "env", "jax": jax.__version__, "backend": jax.default_backend(),
                    "device": device.device_kind, "device_count": jax.device_count(),
                    "xla_flags": os.environ.get("XLA_FLAGS", "")}),
        flush=True)
  matmul = Matmul(args.matmul_n, args.dtype)
  matmul.report(max(args.steps, 5))
  for name, (model_config, shape) in _models(args.dtype, args.remat).items():
    if args.which not in ("all", name):
      continue
    for batch in [int(b) for b in args.batches.split(",") if b] or [shape[0]]:
      try:
        bench_model(name, model_config, (batch,) + shape[1:], args.steps, matmul)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        # List batches in increasing order: the last line before this is the largest that fits.
        print(json.dumps({"bench": "out_of_memory", "model": name, "batch": batch,
                          "dtype": model_config["dtype"]}), flush=True)
        break


if __name__ == "__main__":
  main()
