"""XLA flags the project sets by default, each kept because a benchmark showed it pays.

XLA reads XLA_FLAGS once per process, when JAX first uses a backend, so
`apply_defaults()` must run before the first computation: `main.py` calls it
first thing, the tests' conftest at import, each benchmark at the start of its
main(). A flag the user already put in XLA_FLAGS is left as the user set it.
"""
import os

from absl import logging
import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

# jaxlib 0.10's XLA:CPU hands convolutions, dots, elementwise ops and reductions
# to YNNPACK fusions. On the convolutions of diffusion U-Nets these ran slower
# than XLA's own code: with every YNNPACK fusion type removed, the CPU default
# model's train step ran 1.4x faster, forward passes (what samplers run) 1.4-1.9x
# faster, and a large matmul no slower (benchmarks/cpu_backend_bench.py,
# docs/benchmarks.md). Removing each type ("-" items) rather than naming none
# avoids XLA's error log for an empty choice. The flag is experimental, so it is
# set only on the jax versions where it was measured: XLA_FLAGS with an unknown
# flag would abort the process.
_CPU_DEFAULTS = {"--xla_cpu_experimental_ynn_fusion_type":
                 "-dot,-individual_dot,-individual_convolution,-eltwise,-reduce"}
_MEASURED_JAX = ("0.10.",)


def apply_defaults(environ=None) -> list[str]:
  """Adds the project's default XLA flags to XLA_FLAGS where the user set none.

  Args:
    environ: the environment to change (default `os.environ`).

  Returns:
    The flags added, e.g. ["--xla_cpu_experimental_ynn_fusion_type=-dot,..."].
  """
  environ = os.environ if environ is None else environ
  if not jax.__version__.startswith(_MEASURED_JAX):
    return []
  current = environ.get("XLA_FLAGS", "").split()
  added = [f"{name}={value}" for name, value in _CPU_DEFAULTS.items()
           if not any(f == name or f.startswith(name + "=") for f in current)]
  if not added:
    return []
  if environ is os.environ and xla_bridge.backends_are_initialized():
    logging.warning("JAX's backend is already running, so these XLA flags take no "
                    "effect in this process: %s. Set them in XLA_FLAGS before starting.",
                    " ".join(added))
    return []
  environ["XLA_FLAGS"] = " ".join(current + added)
  return added
