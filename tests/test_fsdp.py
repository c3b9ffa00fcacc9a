"""FSDP on the 4 fake CPU devices: a ("data", "fsdp") mesh of 2 x 2.

One FSDP run of configs/test.py is stopped by a real SIGTERM (single process:
the plain signal-handler path of preemption.py); a data-parallel run then
trains the same number of steps; the tests compare them and restore the FSDP
checkpoint into the data-parallel layout.
"""
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from diffusion_jax import builders, checkpointing, models, optim, parallel, train

# FSDP changes how XLA partitions the step (gathers, reduce-scatters instead of
# one all-reduce), so sums run in another order: equal up to float32 rounding.
# Measured over 4-6 steps: losses within 3e-7 relative, each state part within
# 1e-6 of its largest magnitude. Allowed: 1e-5 for both.
LOSS_RTOL = 1e-5
SCALED_TOLERANCE = 1e-5


def _config(data_dir, fsdp, num_steps):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.parallel.fsdp_axis_size = fsdp
  config.training.num_train_steps = num_steps
  config.training.log_every_steps = 1
  config.training.sample_every_steps = 0
  config.training.checkpoint_every_steps = 1000
  return config


def _losses(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _sigterm_after(workdir, step, done: threading.Event):
  """Sends SIGTERM to this process once metrics.jsonl reaches `step`."""
  path = os.path.join(workdir, "metrics.jsonl")
  while not done.is_set():
    if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
      os.kill(os.getpid(), signal.SIGTERM)
      return
    time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory):
  fsdp_dir = str(tmp_path_factory.mktemp("fsdp"))
  done = threading.Event()
  # A stray SIGTERM after the loop (its handler is gone) must not kill pytest.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  sender = threading.Thread(target=_sigterm_after, args=(fsdp_dir, 4, done))
  try:
    sender.start()
    fsdp_state = train.train_and_evaluate(_config(digits_dir, 2, 1000), fsdp_dir)
  finally:
    done.set()
    sender.join()
    signal.signal(signal.SIGTERM, previous)
  steps = int(fsdp_state.step)
  dp_dir = str(tmp_path_factory.mktemp("dp"))
  dp_state = train.train_and_evaluate(_config(digits_dir, 1, steps), dp_dir)
  return dict(fsdp_dir=fsdp_dir, dp_dir=dp_dir, fsdp_state=fsdp_state, dp_state=dp_state,
              steps=steps, digits_dir=digits_dir)


def _scaled_diffs(a, b) -> dict[str, float]:
  """Per part of the state: max |a - b| / max |b| (see test_multihost)."""
  out = {}
  for part in ("params", "ema_params", "opt_state"):
    pa, pb = jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
               for x, y in zip(pa, pb, strict=True))
    scale = max(float(np.max(np.abs(np.asarray(y)))) for y in pb)
    out[part] = diff / scale
  return out


def test_sigterm_stops_a_single_process_run_with_a_checkpoint(runs):
  steps = runs["steps"]
  assert 4 <= steps < 1000
  assert checkpointing.Checkpointer(runs["fsdp_dir"]).all_steps() == [steps]


def test_fsdp_trains_like_data_parallel(runs):
  fsdp, dp = _losses(runs["fsdp_dir"]), _losses(runs["dp_dir"])
  assert sorted(fsdp) == sorted(dp) == list(range(1, runs["steps"] + 1))
  a, b = np.array([fsdp[s] for s in sorted(fsdp)]), np.array([dp[s] for s in sorted(dp)])
  print(f"fsdp vs data parallel losses over {len(a)} steps: max relative diff "
        f"{np.max(np.abs(a - b) / np.abs(b)):.1e}")
  np.testing.assert_allclose(a, b, rtol=LOSS_RTOL)
  fsdp_host, dp_host = jax.device_get(runs["fsdp_state"]), jax.device_get(runs["dp_state"])
  diffs = _scaled_diffs(fsdp_host, dp_host)
  print("fsdp vs data parallel:", diffs)
  assert max(diffs.values()) < SCALED_TOLERANCE, diffs


def test_fsdp_state_is_split_over_the_fsdp_axis(runs):
  state = runs["fsdp_state"]
  mesh = next(iter(jax.tree.leaves(state.params))).sharding.mesh
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  kernel = state.params["down_0_block_0"]["conv1"]["kernel"]  # [3, 3, 32, 32]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 32, 16)
  bias = state.params["down_0_block_0"]["conv1"]["bias"]  # 32 < fsdp_min_size
  assert bias.sharding.spec == P()
  _check_bytes(runs["dp_state"].params, state.params, 2)


def _check_bytes(replicated, sharded, k):
  """Each device holds 1/k of the split arrays and all of the replicated ones."""
  full = parallel.bytes_per_device(replicated)
  per_device = parallel.bytes_per_device(sharded)
  split = [leaf for leaf in jax.tree.leaves(sharded) if leaf.sharding.spec != P()]
  split_bytes = sum(leaf.nbytes for leaf in split)
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(sharded))
  assert set(per_device.values()) == {total - split_bytes + split_bytes // k}
  assert set(full.values()) == {total}
  print(f"fsdp={k}: {min(per_device.values())} of {total} parameter bytes per device "
        f"({total / min(per_device.values()):.2f}x less); split arrays hold "
        f"{split_bytes / total:.1%} of the bytes")


def test_fsdp_over_all_four_devices_divides_parameter_bytes_by_four(runs):
  mesh = parallel.make_mesh(fsdp_axis_size=4)
  host = jax.device_get(runs["dp_state"].params)
  shardings = parallel.state_shardings(host, mesh, min_size=0)
  sharded = jax.device_put(host, shardings)
  # min_size=0: every array with a dimension divisible by 4 is split.
  unsplit = [a.shape for a in jax.tree.leaves(sharded) if a.sharding.spec == P()]
  assert all(all(d % 4 for d in shape) for shape in unsplit), unsplit
  _check_bytes(runs["dp_state"].params, sharded, 4)


def test_fsdp_checkpoint_restores_into_data_parallel_and_sample_mode(runs):
  config = _config(runs["digits_dir"], 1, runs["steps"])
  model = models.create_model(config.model, config.data.channels)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  mesh = parallel.make_mesh()
  ckpt = checkpointing.Checkpointer(runs["fsdp_dir"])
  state = ckpt.restore_latest(train.abstract_train_state(model, tx, config, mesh))
  ema, step = ckpt.restore_ema_params(builders.abstract_params(model, config, mesh))
  ckpt.close()
  assert step == runs["steps"]
  assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(state))
  expected = jax.device_get(runs["fsdp_state"])
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(ema)), jax.tree.leaves(expected.ema_params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape, k, min_size, spec", [
    ((3, 3, 32, 64), 2, 0, P(None, None, None, "fsdp")),  # largest dim
    ((3, 3, 64, 64), 2, 0, P(None, None, None, "fsdp")),  # ties: the last
    ((128, 30), 4, 0, P("fsdp")),  # 30 does not divide by 4
    ((30, 6), 4, 0, P()),  # none divides: replicated
    ((64,), 2, 128, P()),  # below min_size: replicated
    ((64,), 2, 64, P("fsdp")),
    ((), 2, 0, P()),  # scalars (the step)
    ((3, 3, 32, 64), 1, 0, P()),  # no fsdp axis
])
def test_fsdp_spec_rule(shape, k, min_size, spec):
  assert parallel.fsdp_spec(shape, k, min_size) == spec


def test_mesh_shapes():
  assert dict(parallel.make_mesh().shape) == {"data": 4}
  assert dict(parallel.make_mesh(fsdp_axis_size=2).shape) == {"data": 2, "fsdp": 2}
  assert dict(parallel.make_mesh(data_axis_size=1, fsdp_axis_size=4).shape) == {
      "data": 1, "fsdp": 4}
  mesh = parallel.make_mesh(fsdp_axis_size=2)
  # The batch is split over all 4 devices, fsdp inner: rows 0-1 on device 0, ...
  x = parallel.to_global({"x": np.arange(8.0)}, mesh)["x"]
  assert [s.data.tolist() for s in sorted(x.addressable_shards, key=lambda s: s.device.id)] == [
      [0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
  assert jnp.sum(x) == 28.0
