"""Stopping cleanly on SIGTERM (TPU maintenance events, SLURM's pre-kill signal).

The signal reaches one host, or all of them at slightly different moments,
while each is at its own point in the loop. Every host must stop after the
same step, or one would wait forever in the next step's collectives while the
others save. Two cases:

  * `jax.distributed` initialised: JAX's preemption notifier catches SIGTERM
    on any host and the coordination service picks a step every host agrees
    on; Orbax's `CheckpointManager.reached_preemption(step)` turns True there,
    on every host, at that same step. Every host must ask at every step.
  * a single process without `jax.distributed`: a plain signal handler sets a
    flag; there is no one to agree with.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

import jax
from absl import logging


class PreemptionWatcher:
  """Answers "should every process stop after this step?" once per step.

  Without `jax.distributed` it installs a SIGTERM handler when created; call
  `close()` (or use it as a context manager) after the loop to restore the
  previous one (a test process runs several loops).

  Args:
    reached_preemption: `CheckpointManager.reached_preemption`, called where
      `jax.distributed` is initialised.
  """

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._reached = reached_preemption
    self._distributed = jax.distributed.is_initialized()
    self._signalled = threading.Event()
    self._previous: Optional[Any] = None
    # A Python handler would replace JAX's notifier (both use SIGTERM), and
    # signal.signal only works on the main thread.
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled.set()  # only a flag: the loop saves at a step boundary

  def reached(self, step: int) -> bool:
    """True if every process should checkpoint after `step` and stop.

    Where `jax.distributed` is initialised this is a synchronisation point:
    every process must call it for every step, with the same steps.
    """
    if self._distributed:
      stop = self._reached(step)
    else:
      stop = self._signalled.is_set()
    if stop:
      logging.warning("Preemption (SIGTERM): process %d stops after step %d, saves a "
                      "checkpoint and exits 0; run the same command to resume.",
                      jax.process_index(), step)
    return stop
