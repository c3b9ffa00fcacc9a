"""Multi-host for real: two processes x two CPU devices form one 4-device mesh.

One story, three launches of `launch/local_cpu.py`'s processes, shared by the
tests through module-scoped fixtures:

  1. this (single) process trains 2 steps on its 4 devices and writes a
     checkpoint (no data-iterator state for 2 processes);
  2. the pair restores it, trains on, and gets a real SIGTERM to process 1
     only: both stop at the same step S, save and exit 0;
  3. the pair is started again, resumes from S and ends at S + 2.

The reference is this process's 4-device run fed the same global batches
(process 0's local batch, then process 1's: the devices' order). A fourth
launch kills one process and times how fast the other gives up.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import test as test_config
from diffusion_jax import (builders, checkpointing, input_pipeline, models, multihost,
                           optim, parallel, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import local_cpu  # noqa: E402  (launch/ is scripts, not a package)

HEARTBEAT_S = 10  # a dead peer must end the run within seconds, not JAX's 100
FIRST_STEPS = 2  # trained by this process before the pair takes over
NUM_STEPS = 1000  # the pair's run length; it is preempted long before
TIMEOUT_S = 300  # per launch, a safety net only


def _config(data_dir, num_steps=NUM_STEPS):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.training.num_train_steps = num_steps
  return config


def _main_args(workdir, data_dir, num_steps=NUM_STEPS):
  return ["--config=configs/test.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}",
          f"--config.training.num_train_steps={num_steps}",
          "--config.training.log_every_steps=1", "--config.training.sample_every_steps=0",
          "--config.training.checkpoint_every_steps=1000",
          f"--distributed_heartbeat_timeout={HEARTBEAT_S}", "--distributed_init_timeout=60"]


class Reference:
  """The single-process 4-device run, fed the pair's global batches."""

  def __init__(self, config):
    self.config = config
    self.mesh = parallel.make_mesh()
    model = models.create_model(config.model, config.data.channels)
    tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
    self.step_fn = train.make_train_step(model, builders.make_schedule(config), tx, config,
                                         self.mesh)
    # The keys train_and_evaluate derives from the seed.
    key = jax.random.key(config.seed)
    self.train_key = jax.random.fold_in(key, train._TRAIN)  # pylint: disable=protected-access
    init_key = jax.random.fold_in(key, train._INIT)  # pylint: disable=protected-access
    self.state = train.create_train_state(model, tx, config, init_key, self.mesh)
    self.restart_data()

  def restart_data(self):
    """Fresh iterators of process 0 and 1 of 2, as a pair without data state has."""
    self.iters = [input_pipeline.create_train_iterator(
        self.config.data, self.config.training.batch_size, self.config.seed,
        process_index=i, process_count=2) for i in range(2)]

  def train(self, num_steps):
    losses = []
    for _ in range(num_steps):
      local = [next(it) for it in self.iters]
      batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
      self.state, stats = self.step_fn(self.state, parallel.to_global(batch, self.mesh),
                                       self.train_key)
      losses.append(float(stats["loss"]))
    return losses

  def host_state(self):
    return jax.device_get(self.state)


def _restore_latest(config, workdir):
  """The newest checkpoint of `workdir`, restored in this (single) process, as numpy."""
  model = models.create_model(config.model, config.data.channels)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  ckpt = checkpointing.Checkpointer(workdir)
  state = ckpt.restore_latest(train.abstract_train_state(model, tx, config, parallel.make_mesh()))
  ckpt.close()
  return jax.device_get(state)


def _metric_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _launch(tag, workdir, data_dir, logs, num_steps=NUM_STEPS):
  paths = [os.path.join(logs, f"{tag}_{i}.log") for i in range(2)]
  procs = local_cpu.spawn(_main_args(workdir, data_dir, num_steps), 2, 2,
                          outputs=[open(p, "w") for p in paths])
  return procs, paths


def _wait(procs, timeout=TIMEOUT_S):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _read(path):
  with open(path) as f:
    return f.read()


def _wait_for(predicate, procs, timeout=TIMEOUT_S, what=""):
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
      raise AssertionError(f"gave up waiting for {what}; exit codes "
                           f"{[p.poll() for p in procs]}")
    time.sleep(0.05)


# Not bitwise: across processes the gradient all-reduce runs in gloo, which adds the
# devices' partial sums in another order than XLA's in-process all-reduce, so the
# gradients differ in their last bits. Element-wise relative differences are
# meaningless here: parameters whose exact gradient is zero (a bias before a
# GroupNorm, an attention key bias) hold pure rounding noise (~1e-12). So each
# part of the state (params, EMA, Adam's mu, Adam's nu) is judged at its own
# scale: max |pair - single| / max |single|. Measured after 6 and 8 steps: at most
# 5e-8 (params, EMA) and 2.2e-7 (mu, nu). Allowed: 1e-5. Step counters: equal.
SCALED_TOLERANCE = 1e-5


def _scaled_diffs(a, b) -> dict[str, float]:
  """Per part of the state: max |a - b| over its arrays / max |b| over them."""
  diff, scale = {}, {}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                          strict=True):
    name = jax.tree_util.keystr(path)
    part = re.match(r"\.(\w+)", name).group(1) + next(
        (m for m in (".mu", ".nu") if m in name), "")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    diff[part] = max(diff.get(part, 0.0), float(np.max(np.abs(x - y))))
    scale[part] = max(scale.get(part, 0.0), float(np.max(np.abs(y))))
  return {k: diff[k] / scale[k] if scale[k] else diff[k] for k in diff}


def _assert_close(pair, single, what):
  diffs = _scaled_diffs(pair, single)
  print(f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(diffs.items())))
  assert int(pair.step) == int(single.step)
  assert max(diffs.values()) < SCALED_TOLERANCE, diffs


@pytest.fixture(scope="module")
def story(digits_dir, tmp_path_factory):
  """Runs the module docstring's three launches; returns what the tests check."""
  base = str(tmp_path_factory.mktemp("multihost"))
  workdir = os.path.join(base, "run")
  config = _config(digits_dir)
  ref = Reference(config)
  # 1. A single-process run's checkpoint (no data state for 2 processes).
  ref.train(FIRST_STEPS)
  checkpointing.save_config(workdir, config)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(FIRST_STEPS, ref.state)
  ckpt.close()  # waits: the next step donates these buffers
  # 2. The pair resumes from it; SIGTERM to process 1 after a few steps.
  procs, logs1 = _launch("preempted", workdir, digits_dir, base)
  _wait_for(lambda: max(_metric_steps(workdir), default=0) >= FIRST_STEPS + 2, procs,
            what="two steps of the pair")
  signalled = time.time()
  procs[1].send_signal(signal.SIGTERM)
  codes1 = _wait(procs)
  stop_seconds = time.time() - signalled
  stops = [re.findall(r"process (\d) stops after step (\d+)", _read(p)) for p in logs1]
  preempt_step = int(stops[0][0][1])
  ref.restart_data()  # the pair found no data state for 2 processes
  ref_losses = [None] * FIRST_STEPS + ref.train(preempt_step - FIRST_STEPS)
  ref_at_preemption = ref.host_state()
  pair_at_preemption = _restore_latest(config, workdir)
  steps_after_preemption = checkpointing.Checkpointer(workdir).all_steps()
  # 3. The same command again resumes from the preemption checkpoint.
  final_step = preempt_step + 2
  procs, logs2 = _launch("resumed", workdir, digits_dir, base, num_steps=final_step)
  codes2 = _wait(procs)
  ref.train(2)
  return dict(config=config, workdir=workdir, logs1=logs1, logs2=logs2, codes1=codes1,
              codes2=codes2, stops=stops, stop_seconds=stop_seconds,
              preempt_step=preempt_step, final_step=final_step, ref_losses=ref_losses,
              ref_at_preemption=ref_at_preemption, pair_at_preemption=pair_at_preemption,
              steps_after_preemption=steps_after_preemption, ref_final=ref.host_state(),
              pair_final=_restore_latest(config, workdir))


def test_two_processes_form_one_mesh_and_only_process_0_logs(story):
  out0, out1 = (_read(p) for p in story["logs1"])
  assert "Process 0 of 2: 2 local devices, 4 global devices." in out0
  assert "Process 1 of 2: 2 local devices, 4 global devices." in out1
  assert f"step {FIRST_STEPS + 1}/" in out0 and f"step {FIRST_STEPS + 1}/" not in out1


def test_single_process_checkpoint_restores_in_the_pair(story):
  out0 = _read(story["logs1"][0])
  assert f"Resumed from step {FIRST_STEPS}" in out0
  for path in story["logs1"]:
    assert "holds no data-iterator state for 2 process(es)" in _read(path)


def test_sigterm_to_one_process_stops_both_at_one_step_with_a_checkpoint(story):
  step = story["preempt_step"]
  assert story["codes1"] == [0, 0], story["codes1"]
  assert story["stops"] == [[("0", str(step))], [("1", str(step))]]
  assert FIRST_STEPS + 2 <= step < NUM_STEPS
  assert story["steps_after_preemption"] == [FIRST_STEPS, step]
  data_dir = os.path.join(story["workdir"], "checkpoints", str(step), "data")
  assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json",
                                          "process_1-of-2.json"]
  assert story["stop_seconds"] < 60


def test_pair_equals_the_single_process_run(story):
  """Same global batches on the same 4 devices, over 1 process or 2."""
  assert int(story["pair_at_preemption"].step) == story["preempt_step"]
  _assert_close(story["pair_at_preemption"], story["ref_at_preemption"], "pair vs single")
  with open(os.path.join(story["workdir"], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  pair_losses = {r["step"]: r["loss"] for r in rows}
  for step in range(FIRST_STEPS + 1, story["preempt_step"] + 1):
    np.testing.assert_allclose(pair_losses[step], story["ref_losses"][step - 1], rtol=1e-6)


def test_restarted_pair_resumes_from_the_preemption_checkpoint(story):
  assert story["codes2"] == [0, 0], story["codes2"]
  assert f"Resumed from step {story['preempt_step']}" in _read(story["logs2"][0])
  assert "data-iterator state" not in _read(story["logs2"][0])
  assert int(story["pair_final"].step) == story["final_step"]
  _assert_close(story["pair_final"], story["ref_final"], "resumed pair vs single")


def test_dead_peer_ends_the_run_within_the_heartbeat_timeout(digits_dir, tmp_path):
  procs, logs = _launch("killed", str(tmp_path / "run"), digits_dir, str(tmp_path))
  _wait_for(lambda: "Process 0 of 2" in _read(logs[0]), procs, what="the pair to connect")
  killed = time.time()
  procs[1].send_signal(signal.SIGKILL)
  code = _wait(procs[:1], timeout=HEARTBEAT_S + 50)[0]
  seconds = time.time() - killed
  assert code != 0
  assert seconds < HEARTBEAT_S + 20, seconds


def test_unreachable_coordinator_is_a_clear_error_within_seconds(tmp_path):
  port = local_cpu.free_port()  # nothing listens there
  start = time.time()
  with pytest.raises(multihost.DistributedInitError,
                     match=f"Process 1 could not reach the coordinator at 127.0.0.1:{port} "
                           "within 2 s"):
    multihost.wait_for_coordinator(f"127.0.0.1:{port}", 2, 1)
  assert time.time() - start < 4
  out = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--config=configs/test.py",
       f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", "--process_id=1", "--distributed_init_timeout=3"],
      cwd=ROOT, env=local_cpu.process_env(2), capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "could not reach the coordinator" in out.stderr.splitlines()[-1]


def test_a_name_that_does_not_resolve_fails_at_once(monkeypatch):
  def no_such_host(*args, **kwargs):
    raise multihost.socket.gaierror(-2, "Name or service not known")
  monkeypatch.setattr(multihost.socket, "create_connection", no_such_host)
  start = time.time()
  with pytest.raises(multihost.DistributedInitError,
                     match=r"at no-such-host:1234 \(\[Errno -2\] Name or service not known"):
    multihost.wait_for_coordinator("no-such-host:1234", 300, 1)
  assert time.time() - start < 1


@pytest.mark.parametrize("args, message", [
    (dict(coordinator_address="h:1"), "missing: num_processes, process_id"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "is not host:port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "not in \\[0, "),
])
def test_incomplete_or_bad_process_flags_are_errors(args, message):
  with pytest.raises(multihost.DistributedInitError, match=message):
    multihost.resolve(**args, env={})


def test_where_processes_come_from():
  assert multihost.resolve(env={"SLURM_NTASKS": "16"}).source == "slurm"
  assert multihost.resolve(env={"SLURM_NTASKS": "1"}).source in ("single", "tpu")
  # A batch script's shell in a 16-task job is one task, not srun's 16.
  assert multihost.resolve(env={"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1"}
                           ).source in ("single", "tpu")
  spec = multihost.resolve(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"})
  assert (spec.source, spec.coordinator_address, spec.num_processes, spec.process_id) == (
      "explicit", "10.0.0.1:1234", 4, 3)


def test_batch_and_mesh_that_do_not_fit_the_devices_are_errors(digits_dir):
  config = _config(digits_dir)
  config.training.batch_size = 6
  with pytest.raises(ValueError, match="global batch size 6 must be a positive multiple of "
                                       "the number of devices \\(4 over 1 process"):
    train.Trainer(config, "/nonexistent")
  config.training.batch_size = 8
  config.parallel.fsdp_axis_size = 3
  with pytest.raises(ValueError, match=r"mesh \(data=-1, fsdp=3\) does not match the 4 "
                                       r"devices(.|\n)*fsdp_axis_size in \[1, 2, 4\]"):
    train.Trainer(config, "/nonexistent")
  config.parallel.fsdp_axis_size, config.parallel.data_axis_size = 2, 4
  with pytest.raises(ValueError, match="data x fsdp must equal 4"):
    parallel.mesh_from_config(config)
