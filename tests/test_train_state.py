"""The parameter EMA against closed forms, alone and inside the real train step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from diffusion_jax import optim, schedules, train
from diffusion_jax.train_state import TrainState, ema_decay_at, ema_update
from tests.conftest import apply_overrides


def _ref_decay(n, decay, warmup):
  """min(decay, (1 + n) / (10 + n)) with warmup, else decay (float64)."""
  return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


def test_ema_decay_at_closed_form():
  """Reference: the documented min(decay, (1 + n) / (10 + n)), in float64."""
  # With decay 0.9 the ramp reaches the cap at n = 80 exactly.
  for n in (0, 1, 2, 5, 79, 80, 81, 500):
    for decay in (0.9, 0.999):
      got = float(ema_decay_at(jnp.int32(n), decay, True))
      assert got == pytest.approx(_ref_decay(n, decay, True), rel=1e-6), (n, decay)
      assert float(ema_decay_at(jnp.int32(n), decay, False)) == pytest.approx(decay, rel=1e-7)
  assert float(ema_decay_at(jnp.int32(0), 0.999, True)) == pytest.approx(0.1, rel=1e-6)
  assert float(ema_decay_at(jnp.int32(90), 0.9, True)) == pytest.approx(0.9, rel=1e-7)


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"a": rng.normal(size=(3, 2)).astype(np.float32),
          "b": {"c": rng.normal(size=(4,)).astype(np.float32)}}


def test_ema_update_one_step_and_constant_params_closed_form():
  """References: one step is decay * ema + (1 - decay) * params, leaf by leaf; N
  steps towards constant params p from e0 give p + prod_n(decay_n) (e0 - p)."""
  e0, p = _tree(0), _tree(1)
  got = ema_update(jax.tree.map(jnp.asarray, e0), jax.tree.map(jnp.asarray, p), jnp.float32(0.8))
  for key in ("a", "c"):
    e = e0["a"] if key == "a" else e0["b"]["c"]
    q = p["a"] if key == "a" else p["b"]["c"]
    g = got["a"] if key == "a" else got["b"]["c"]
    np.testing.assert_allclose(g, 0.8 * e.astype(np.float64) + 0.2 * q, rtol=1e-6, atol=1e-7)
  # bfloat16 params are averaged into float32 EMA leaves.
  got = ema_update({"a": jnp.asarray(e0["a"])}, {"a": jnp.asarray(p["a"], jnp.bfloat16)},
                   jnp.float32(0.5))
  assert got["a"].dtype == jnp.float32
  # (warmup, decay, first step, last step + 1); 75..85 crosses the cap at n = 80.
  for warmup, decay, n0, n1 in ((False, 0.9, 0, 25), (True, 0.9, 0, 3), (True, 0.999, 0, 4),
                                (True, 0.9, 75, 85)):
    ema = jax.tree.map(jnp.asarray, e0)
    params = jax.tree.map(jnp.asarray, p)
    for n in range(n0, n1):
      ema = ema_update(ema, params, ema_decay_at(jnp.int32(n), decay, warmup))
    factor = np.prod([_ref_decay(n, decay, warmup) for n in range(n0, n1)])
    assert factor > 1e-4  # e0 still visible in the result
    for g, e, q in zip(jax.tree.leaves(ema), jax.tree.leaves(e0), jax.tree.leaves(p)):
      ref = q.astype(np.float64) + factor * (e.astype(np.float64) - q)
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


class _Tiny(nn.Module):
  """A per-pixel linear map of the channels: enough for a real gradient step."""

  @nn.compact
  def __call__(self, x, t, cond=None, train=False):
    c = x.shape[-1]
    w = self.param("w", nn.initializers.normal(0.5), (c, c))
    b = self.param("b", nn.initializers.normal(0.1), (c,))
    return x @ w + b + 1e-3 * t.astype(jnp.float32)[:, None, None, None]


def test_train_step_ema_is_decay_of_old_ema_and_new_params():
  """Reference: after one real train step, in float64 numpy from the states,
  ema' = d * ema + (1 - d) * params' with d = ema_decay_at(step before the update),
  i.e. min(0.999, (1 + n) / (10 + n)) with the default warm-up."""
  warmup = True
  config = apply_overrides(test_config.get_config(), optim__ema_decay=0.999,
                           optim__ema_warmup=warmup, optim__warmup_steps=0, optim__lr=0.05)
  model = _Tiny()
  schedule = schedules.make_schedule("linear", config.diffusion.num_timesteps)
  tx = optim.make_optimizer(config.optim, config.training.num_train_steps)
  image = jax.random.uniform(jax.random.key(0), (8, 4, 4, 2), minval=-1, maxval=1)
  params = model.init(jax.random.key(1), image, jnp.zeros((8,), jnp.int32))["params"]
  ema = jax.tree.map(lambda a: a + 0.3, params)  # away from params, so both terms show
  step_fn = jax.jit(train.train_step_fn(model, schedule, tx, config))
  for start_step in (0, 7):
    state = TrainState(step=jnp.int32(start_step), params=params, ema_params=ema,
                       opt_state=tx.init(params))
    new, stats = step_fn(state, {"image": image}, jax.random.key(2))
    d = _ref_decay(start_step, 0.999, warmup)  # 0.1 and 8/17 with warm-up
    assert int(new.step) == start_step + 1
    assert float(stats["ema_decay"]) == pytest.approx(d, rel=1e-6)
    assert float(stats["lr"]) == pytest.approx(0.05, rel=1e-6)  # no lr warm-up here
    for old_e, new_p, old_p, new_e in zip(*map(jax.tree.leaves, (
        ema, new.params, params, new.ema_params))):
      old_e, new_p, old_p = (np.asarray(a, np.float64) for a in (old_e, new_p, old_p))
      assert np.abs(new_p - old_p).max() > 1e-2  # the step moved the params
      np.testing.assert_allclose(new_e, d * old_e + (1 - d) * new_p, rtol=1e-6, atol=1e-6)
