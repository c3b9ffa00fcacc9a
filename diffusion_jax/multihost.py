"""Joining a multi-host run: `jax.distributed` on TPU pods, SLURM, flags, local CPU.

Every process of a run calls `initialize` before any other JAX call. Where the
run's processes come from, in order of precedence:

  1. explicit: `--coordinator_address/--num_processes/--process_id` (or the
     environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID): any cluster, and several processes on one machine;
  2. SLURM with more than one task (`srun`): JAX reads SLURM's variables;
  3. a Cloud TPU VM (a TPU on the PCI bus): JAX reads the pod's metadata. One
     host gets it too, because JAX delivers preemption notices (maintenance
     events) only where `jax.distributed` is initialised;
  4. otherwise a single process: nothing to do.

Failures are made quick and clear rather than left to JAX's defaults, which
wait 5 minutes for a coordinator and 100 s for a dead peer and then abort in
C++ with an RPC error: a worker first checks it can open a TCP connection to
the coordinator, and the timeouts are arguments (flags in main.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import os
import socket
import sys
import time
from typing import Iterator, Mapping, Optional

import jax
from absl import logging

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPUs are PCI devices of this vendor...
# ...with these device ids (v3, -, v4, v5p, v5e, v6e, 7x), as jax 0.10 lists them.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH)


class DistributedInitError(RuntimeError):
  """This process cannot join the multi-host run (bad flags, no coordinator)."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """How this process joins a run; None fields are left to JAX's detection.

  Attributes:
    source: "explicit", "slurm", "tpu" or "single" (nothing to initialise).
    coordinator_address: "host:port" of process 0's coordinator.
    num_processes: processes in the run.
    process_id: this process, in [0, num_processes).
  """
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def _on_cloud_tpu_vm() -> bool:
  """True where a TPU chip sits on the PCI bus (JAX's own test for a TPU VM).

  The vendor alone is not enough: Google's gVNIC network card has the same
  vendor id on GPU VMs.
  """
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError):  # private API moved: same test, ids of jax 0.10
    pass
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        vendor = f.read().strip()
      with open(os.path.join(os.path.dirname(path), "device")) as f:
        device = f.read().strip()
    except OSError:
      continue
    if vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES:
      return True
  return False


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedInitError(f"{name}={value!r} is not an integer.") from None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None,
            env: Optional[Mapping[str, str]] = None) -> ProcessSpec:
  """Decides how this process joins the run (see the module docstring).

  Raises:
    DistributedInitError: explicit settings are incomplete or inconsistent.
  """
  env = os.environ if env is None else env
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
  given = {"coordinator_address": address, "num_processes": count, "process_id": index}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise DistributedInitError(
          f"A multi-process run needs --coordinator_address, --num_processes and "
          f"--process_id together (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
          f"JAX_PROCESS_ID); missing: {', '.join(missing)}.")
    if address.count(":") < 1 or not address.rsplit(":", 1)[1].isdigit():
      raise DistributedInitError(f"coordinator address {address!r} is not host:port.")
    if count < 1 or not 0 <= index < count:
      raise DistributedInitError(
          f"process_id {index} is not in [0, num_processes={count}).")
    return ProcessSpec("explicit", address, count, index)
  # srun sets the step's task count; a batch script's own shell (one task,
  # not srun) must not wait for the job's other tasks.
  step_tasks = _env_int(env, "SLURM_STEP_NUM_TASKS")
  tasks = step_tasks if step_tasks is not None else _env_int(env, "SLURM_NTASKS")
  if (tasks or 1) > 1:
    return ProcessSpec("slurm")
  if _on_cloud_tpu_vm():
    return ProcessSpec("tpu")
  return ProcessSpec("single")


def wait_for_coordinator(address: str, timeout_s: float, process_id: int) -> None:
  """Retries a TCP connect to `address` until it succeeds or `timeout_s` passes.

  JAX itself would retry for its whole init timeout and then abort the
  process from C++ with "DEADLINE_EXCEEDED ... RegisterTask"; this says what
  is wrong, in Python, first.

  Raises:
    DistributedInitError: nothing accepted a connection at `address` in time.
  """
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      # A name that does not resolve or a host with no route will not get
      # better by waiting; a refused or silent port may (process 0 starting).
      final = isinstance(e, socket.gaierror) or e.errno in _UNREACHABLE
      if final or time.monotonic() >= deadline:
        waited = "" if final else f" within {timeout_s:g} s"
        raise DistributedInitError(
            f"Process {process_id} could not reach the coordinator at {address}{waited} "
            f"({e}). Check that process 0 is running and was given the same "
            "--coordinator_address, that the host name resolves from this host and that "
            "the port is open; raise --distributed_init_timeout if process 0 starts "
            "late.") from None
      time.sleep(0.2)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, init_timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> ProcessSpec:
  """Calls `jax.distributed.initialize` where this process is one of several.

  Args:
    coordinator_address: "host:port" of process 0 (explicit runs).
    num_processes: processes in the run (explicit runs).
    process_id: this process's index (explicit runs).
    init_timeout_s: how long every process waits for all others to connect.
    heartbeat_timeout_s: how long after a peer stops responding (crashed,
      killed, lost its host) the others abort instead of hanging in a collective.

  Returns:
    The ProcessSpec that was used.

  Raises:
    DistributedInitError: bad settings, or the coordinator is unreachable.
  """
  spec = resolve(coordinator_address, num_processes, process_id)
  if spec.source == "single":
    return spec
  if spec.source == "explicit" and spec.process_id != 0:
    wait_for_coordinator(spec.coordinator_address, init_timeout_s, spec.process_id)
  # Logged before the call because a timeout in there aborts the process.
  logging.info("jax.distributed.initialize (%s): coordinator %s, process %s of %s; waiting "
               "up to %d s for every process to connect, heartbeat timeout %d s.",
               spec.source, spec.coordinator_address or "<detected>",
               "<detected>" if spec.process_id is None else spec.process_id,
               spec.num_processes or "<detected>", init_timeout_s, heartbeat_timeout_s)
  jax.distributed.initialize(
      coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
      process_id=spec.process_id, initialization_timeout=init_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("Process %d of %d: %d local devices, %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  _no_persistent_cache_across_cpu_processes()
  return spec


def _no_persistent_cache_across_cpu_processes() -> None:
  """Turns JAX's persistent compilation cache off for multi-process CPU runs.

  Measured (jax 0.10.2, CPU): only process 0 ever hits the cache (the other
  processes' cache keys differ, and only process 0 writes), so process 0
  reaches the first collective while the others still compile, and the CPU
  collectives (gloo) give up after 30 s: "Gloo context initialization
  failed: DEADLINE_EXCEEDED". Compiling everywhere keeps processes in step.
  """
  if jax.process_count() > 1 and jax.default_backend() == "cpu" and \
      jax.config.jax_compilation_cache_dir:
    logging.info("Multi-process CPU run: persistent compilation cache off (only process 0 "
                 "would hit it, and gloo times out waiting for the others).")
    jax.config.update("jax_compilation_cache_dir", None)


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
  """Makes an error on one process of a multi-process run end the whole run quickly.

  A Python exception that escapes normally runs JAX's shutdown barrier, which
  waits (5 minutes by default) for peers that are blocked in a collective
  waiting for this process. Exiting at once instead makes this process a dead
  peer, which the others detect within the heartbeat timeout and abort.
  """
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    logging.exception("Process %d failed; exiting now so that the other processes stop "
                      "within the heartbeat timeout instead of hanging.", jax.process_index())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
