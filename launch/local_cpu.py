r"""Several processes on this machine as one multi-host run (CPU devices).

What the multi-process tests use, and a way to try multi-host behaviour
(sharded data, checkpoints from every process, preemption) without a cluster:

  python launch/local_cpu.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/test.py --workdir=/tmp/run

starts `python -m diffusion_jax.main --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=i <your arguments>` for i = 0, 1, each with
XLA_FLAGS=--xla_force_host_platform_device_count=2 and JAX_PLATFORMS=cpu, so
together they form one 4-device mesh. Output lines are prefixed "[i] ".
SIGTERM or SIGINT to this launcher is passed on to every process (they save
a checkpoint at a step they agree on and exit 0). The launcher's exit status
is the first non-zero one of its processes, else 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, base: Optional[dict] = None) -> dict:
  """The environment of one CPU process: its fake device count, no accelerator."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def spawn(main_args: Sequence[str], num_processes: int = 2, devices_per_process: int = 2,
          port: Optional[int] = None,
          outputs: Optional[Sequence[Any]] = None) -> list[subprocess.Popen]:
  """Starts the processes of one run; returns them in process-id order.

  Args:
    main_args: arguments for diffusion_jax.main (--config, --workdir, ...).
    num_processes: processes to start.
    devices_per_process: fake CPU devices each process gets.
    port: the coordinator's port on 127.0.0.1 (default: a free one).
    outputs: per process, where its stdout and stderr go (a file or
      subprocess.PIPE); default: this process's.
  """
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "diffusion_jax.main",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
           f"--process_id={i}", *main_args]
    out = None if outputs is None else outputs[i]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=process_env(devices_per_process),
                                  stdout=out, stderr=None if out is None else subprocess.STDOUT,
                                  text=True))
  return procs


def _relay(index: int, stream) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"[{index}] {line}")
    sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("main_args", nargs="*", help="arguments after -- go to main.py")
  args = parser.parse_args(argv)
  procs = spawn(args.main_args, args.num_processes, args.devices_per_process, args.port,
                outputs=[subprocess.PIPE] * args.num_processes)
  relays = [threading.Thread(target=_relay, args=(i, p.stdout), daemon=True)
            for i, p in enumerate(procs)]
  for t in relays:
    t.start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [p.wait() for p in procs]
  for t in relays:
    t.join(timeout=5)
  return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
