"""Device mesh, shardings and global batches from per-process data.

The default mesh has one axis, "data", over every device of every host: the
batch is split over it and the train state is replicated. With
`config.parallel.fsdp_axis_size = k > 1` the mesh is ("data", "fsdp") of
shape (n / k, k): the batch is split over all n devices and each array of the
state (parameters, EMA, optimizer moments) is split k ways over "fsdp"
(fully sharded data parallelism, ZeRO-3). `jax.jit` with these shardings does
the rest: XLA all-gathers a layer's weights where they are used and
reduce-scatters their gradients; no pmap, no manual collectives.

The "fsdp" axis is the mesh's inner axis, so with k <= the devices of one
host its gathers stay inside a host (on TPU: on the fast interconnect) and
only the data-parallel gradient reduction crosses hosts.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def make_mesh(devices: Optional[list] = None, *, data_axis_size: int = -1,
              fsdp_axis_size: int = 1) -> Mesh:
  """The training mesh over `devices` (default: all devices of all hosts).

  Args:
    devices: devices in mesh order (jax.devices() orders them by process).
    data_axis_size: devices along "data"; -1 means all that "fsdp" leaves.
    fsdp_axis_size: devices along "fsdp"; 1 gives the 1-axis data mesh.

  Returns:
    Mesh ("data",) of shape (n,), or ("data", "fsdp") of shape (n / k, k).

  Raises:
    ValueError: the axis sizes do not multiply to the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp_axis_size < 1 or data_axis_size == 0 or data_axis_size < -1:
    raise ValueError(f"Mesh axis sizes must be >= 1 (data may be -1): got "
                     f"data={data_axis_size}, fsdp={fsdp_axis_size}.")
  data = n // fsdp_axis_size if data_axis_size == -1 else data_axis_size
  if data * fsdp_axis_size != n:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(
        f"The mesh (data={data_axis_size}, fsdp={fsdp_axis_size}) does not match the "
        f"{n} devices over {jax.process_count()} process(es): data x fsdp must equal "
        f"{n}. Use parallel.data_axis_size=-1 and an fsdp_axis_size in {divisors}.")
  if fsdp_axis_size == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  return Mesh(np.asarray(devices).reshape(data, fsdp_axis_size), (DATA_AXIS, FSDP_AXIS))


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: Optional[list] = None) -> Mesh:
  """make_mesh with the sizes of `config.parallel`."""
  p = config.parallel
  return make_mesh(devices, data_axis_size=p.data_axis_size, fsdp_axis_size=p.fsdp_axis_size)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device (all mesh axes)."""
  axes = mesh.axis_names
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else tuple(axes)))


def fsdp_spec(shape: tuple[int, ...], fsdp_axis_size: int, min_size: int) -> P:
  """Which dimension of an array of `shape` to split over the "fsdp" axis.

  The rule: the largest dimension that `fsdp_axis_size` divides (the last of
  equals, e.g. a kernel's output features), so each device holds exactly
  1/fsdp_axis_size of the array. Arrays with fewer than `min_size` elements
  (biases, norm scales, the step counter) or no such dimension stay
  replicated: splitting them saves little memory and costs a gather each.

  Returns:
    A PartitionSpec with FSDP_AXIS in one position, or P() (replicated).
  """
  if fsdp_axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_axis_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], i))
  return P(*([None] * dim + [FSDP_AXIS]))


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 0) -> Any:
  """A NamedSharding for every array of a state pytree, by the fsdp_spec rule.

  Parameters and optimizer moments of the same shape get the same split, so
  the update runs where the shards live. On a 1-axis mesh all are replicated.

  Args:
    abstract_state: pytree of arrays or jax.ShapeDtypeStruct.
    mesh: from make_mesh.
    min_size: arrays with fewer elements stay replicated.
  """
  k = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, k, min_size)),
                      abstract_state)


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """Bytes of `tree`'s arrays held by each addressable device."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises a ValueError unless the global batch splits evenly over devices."""
  n = mesh.devices.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(
        f"The global {what} {global_batch} must be a positive multiple of the "
        f"number of devices ({n} over {jax.process_count()} process(es)); set "
        f"it to e.g. {max(n, (global_batch // n) * n)}.")


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns each process's numpy batch into one global array split over devices.

  Args:
    batch: pytree of numpy arrays [local_batch, ...] (this process's shard).
    mesh: the training mesh.

  Returns:
    The same pytree of jax.Arrays of shape [global_batch, ...]; process p's
    rows are the p-th block (devices are ordered by process).
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(x: jax.Array) -> np.ndarray:
  """Gathers a (possibly multi-host) array to a numpy array on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
