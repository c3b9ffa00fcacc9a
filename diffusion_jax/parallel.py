"""Device mesh, shardings and global batches from per-process data.

One mesh axis, "data", spans every device of every host: the batch is split
over it and the train state is replicated. `jax.jit` with these shardings
does the cross-device reductions (no pmap, no manual pmean).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all global devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises a ValueError unless the global batch splits evenly over devices."""
  n = mesh.devices.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f"The global {what} {global_batch} must be a positive multiple of the "
        f"number of devices ({n} over {jax.process_count()} process(es)); set "
        f"it to e.g. {max(n, (global_batch // n) * n)}.")


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns each process's numpy batch into one global array sharded on "data".

  Args:
    batch: pytree of numpy arrays [local_batch, ...] (this process's shard).
    mesh: the data mesh.

  Returns:
    The same pytree of jax.Arrays of shape [global_batch, ...].
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly multi-host) array to a numpy array on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))


def _multi_host_environment() -> bool:
  """True where the platform says this is one process of several."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Cloud TPU VMs of a pod slice list every worker's hostname.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> None:
  """Calls jax.distributed.initialize() where the run spans several hosts.

  Explicit arguments win (a local multi-process run); otherwise TPU pods and
  SLURM jobs are detected from the environment, where JAX finds the rest
  itself. A single host needs nothing and gets nothing.
  """
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _multi_host_environment():
    jax.distributed.initialize()
