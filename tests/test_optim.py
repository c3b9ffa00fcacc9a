"""The optimiser of config.optim against closed forms and a float64 numpy Adam."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from diffusion_jax import optim


def _optim(**fields):
  o = test_config.get_config().optim
  for k, v in fields.items():
    o[k] = v
  return o


def _ref_lr(s, lr, w, n, kind):
  """lr * s / w while s < w; then lr, or lr * 0.5 (1 + cos(pi (s - w) / (n - w)))."""
  if s < w:
    return lr * s / w
  if kind == "constant":
    return lr
  return lr * 0.5 * (1 + math.cos(math.pi * min(s - w, n - w) / (n - w)))


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_lr_schedule_warmup_then_constant_or_cosine_closed_form(kind):
  """Reference: the closed forms of _ref_lr at the ends and interior steps."""
  lr, w, n = 2e-3, 10, 50
  sched = optim.make_lr_schedule(_optim(lr=lr, warmup_steps=w, lr_schedule=kind), n)
  for s in (0, 1, 3, 7, 9, 10, 11, 17, 25, 30, 42, 49, 50, 60):
    assert float(sched(s)) == pytest.approx(_ref_lr(s, lr, w, n, kind), rel=1e-5, abs=1e-6 * lr), s
  if kind == "cosine":  # half-way through the decay: lr / 2; the end: 0
    assert float(sched(30)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(sched(50)) == pytest.approx(0.0, abs=1e-12)
  # No warm-up: the full rate from step 0.
  sched = optim.make_lr_schedule(_optim(lr=lr, warmup_steps=0, lr_schedule=kind), n)
  for s in (0, 1, 13, 25):
    assert float(sched(s)) == pytest.approx(_ref_lr(s, lr, 0, n, kind), rel=1e-5), s


def _ref_adam(params, grads, lrs, b1, b2, eps, wd, clip):
  """float64 numpy: global-norm clipping, Adam with bias correction and eps outside
  the square root, then AdamW's decoupled decay lr * wd * param. Returns the params
  after each step and the first moment after the first step."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out, first_mu = [], None
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = {k: x.astype(np.float64) for k, x in g.items()}
    norm = math.sqrt(sum(np.sum(x**2) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
    if first_mu is None:
      first_mu = {k: x.copy() for k, x in m.items()}
    out.append({k: x.copy() for k, x in p.items()})
  return out, first_mu


def _run(o, params, grads, n=100):
  tx = optim.make_optimizer(o, n)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  out, lrs, mus = [], [], []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
    out.append(jax.tree.map(np.asarray, p))
    lrs.append(float(optim.current_lr(state)))
    mus.append(state[1].inner_state[0].mu)
  return out, lrs, mus


def _problem(scales):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: (s * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
           for s in scales]
  return params, grads


@pytest.mark.parametrize("name,wd", [("adam", 0.0), ("adam", 0.3), ("adamw", 0.3)])
def test_adam_and_adamw_match_float64_numpy(name, wd):
  """Reference: _ref_adam (b1 != b2 and a large eps, so a swap or eps under the root
  shows; AdamW's decay is lr * wd * param; Adam ignores weight_decay). The rate
  warms up over 3 steps, so each update uses a different lr, and current_lr after
  the n-th update (from 0) is the lr that update used: lr(n)."""
  b1, b2, eps, lr, w = 0.8, 0.95, 1e-2, 0.1, 3
  o = _optim(optimizer=name, weight_decay=wd, b1=b1, b2=b2, eps=eps, lr=lr, warmup_steps=w,
             lr_schedule="constant", grad_clip_norm=0.0)
  params, grads = _problem([0.5, 0.02, 1.0, 0.1, 0.3, 0.05])
  got, lrs, _ = _run(o, params, grads)
  ref_lrs = [_ref_lr(s, lr, w, 100, "constant") for s in range(len(grads))]
  np.testing.assert_allclose(lrs, ref_lrs, rtol=1e-6)
  ref, _ = _ref_adam(params, grads, ref_lrs, b1, b2, eps, wd if name == "adamw" else 0.0, 0.0)
  for step, (g, r) in enumerate(zip(got, ref)):
    for k in params:
      np.testing.assert_allclose(g[k], r[k], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {k}")
  assert np.abs(ref[-1]["w"] - params["w"]).max() > 0.05  # the params moved
  if name == "adamw":  # the decay term is visible at this tolerance
    no_decay, _ = _ref_adam(params, grads, ref_lrs, b1, b2, eps, 0.0, 0.0)
    assert np.abs(no_decay[-1]["w"] - ref[-1]["w"]).max() > 1e-2


def test_global_norm_clipping_scales_to_exactly_the_clip_norm():
  """Reference: g * c / ||g|| (the norm over the whole tree) when ||g|| > c, g
  otherwise; seen in Adam's first moment (1 - b1) g_clipped and in the params."""
  clip, b1 = 1.0, 0.8
  o = _optim(optimizer="adam", b1=b1, b2=0.95, eps=1e-2, lr=0.1, warmup_steps=0,
             lr_schedule="constant", grad_clip_norm=clip)
  # The first gradient has every entry below the clip norm but a global norm of
  # 2 * clip; the second is well below it; the third far above it.
  params, _ = _problem([])
  big = {k: np.full(v.shape, 2 * clip / math.sqrt(10), np.float32) for k, v in params.items()}
  small = {k: np.full(v.shape, 0.02, np.float32) * np.sign(v) for k, v in params.items()}
  huge = {k: 40 * v for k, v in params.items()}
  grads = [big, small, huge]
  got, _, mus = _run(o, params, grads)
  norm = lambda t: math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(t)))
  assert norm(big) == pytest.approx(2 * clip, rel=1e-6) and max(
      np.abs(x).max() for x in big.values()) < clip
  # (1 - b1) g_clipped after the first step: the clipped gradient has norm clip exactly.
  assert norm(mus[0]) / (1 - b1) == pytest.approx(clip, rel=1e-6)
  for k in params:
    np.testing.assert_allclose(mus[0][k], (1 - b1) * big[k] * clip / norm(big), rtol=1e-6)
    # The small gradient passes untouched: mu_2 = b1 mu_1 + (1 - b1) g_2.
    np.testing.assert_allclose(mus[1][k], b1 * mus[0][k] + (1 - b1) * small[k], rtol=1e-6)
  ref, _ = _ref_adam(params, grads, [0.1] * 3, b1, 0.95, 1e-2, 0.0, clip)
  for g, r in zip(got, ref):
    for k in params:
      np.testing.assert_allclose(g[k], r[k], rtol=1e-5, atol=1e-6)
  unclipped, _ = _ref_adam(params, grads, [0.1] * 3, b1, 0.95, 1e-2, 0.0, 0.0)
  assert np.abs(unclipped[-1]["w"] - ref[-1]["w"]).max() > 1e-2
