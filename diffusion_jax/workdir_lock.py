"""One workdir, one trainer: an OS lock on `<workdir>/train.lock`.

Two trainers on one workdir would overwrite each other's checkpoints, and the
second one's Orbax start-up would clean up the first one's save in flight. The
lock is `fcntl.flock` on a file, so the kernel drops it when the holding
process exits for any reason (a crash or SIGKILL included): a dead run never
leaves a stale lock. Only process 0 of a multi-process run takes it; the
other processes of the same run share the workdir by design. The file keeps
the holder's pid, host and start time for the error message; its presence
means nothing by itself.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another live training process holds the workdir."""


class WorkdirLock:
  """Holds the workdir's training lock from `acquire()` to `release()`.

  Args:
    workdir: the run's --workdir (created if missing).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirBusyError naming the holder."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f"The workdir {os.path.dirname(self.path)!r} is in use by another training run "
          f"({holder}). Two trainers on one workdir would overwrite each other's "
          "checkpoints: stop that run first (it saves a checkpoint on SIGTERM), or use "
          "another --workdir. The lock goes away by itself when that process exits.") from None
    # Record who holds it (the lock is on the open file, not its contents).
    info = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                           started=time.strftime("%Y-%m-%d %H:%M:%S")))
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return (f"pid {info['pid']} on host {info['host']}, started {info['started']}")
  except (ValueError, KeyError, OSError):
    return "a process that is still starting"
