"""Schedules against float64 numpy references written here."""
import math

import jax
import numpy as np
import pytest

from diffusion_jax import schedules


def ref_betas(name, T):
  k = 1000.0 / T
  if name == "linear":
    return np.linspace(k * 1e-4, k * 0.02, T)
  if name == "quad":
    return np.linspace(math.sqrt(k * 1e-4), math.sqrt(k * 0.02), T) ** 2
  if name == "sigmoid":
    return k * 1e-4 + (k * 0.02 - k * 1e-4) / (1 + np.exp(-np.linspace(-6, 6, T)))
  if name == "cosine":
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
  raise AssertionError(name)


def ref_constants(betas):
  T = len(betas)
  abar = np.empty(T)
  acc = 1.0
  for i in range(T):  # an explicit loop, not cumprod, to stay independent
    acc *= 1 - betas[i]
    abar[i] = acc
  prev = np.concatenate([[1.0], abar[:-1]])
  pv = betas * (1 - prev) / (1 - abar)
  return dict(betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=prev,
              sqrt_alphas_cumprod=np.sqrt(abar),
              sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
              posterior_variance=pv,
              posterior_log_variance_clipped=np.log(np.maximum(pv, pv[1])),
              posterior_mean_coef1=betas * np.sqrt(prev) / (1 - abar),
              posterior_mean_coef2=(1 - prev) * np.sqrt(1 - betas) / (1 - abar))


@pytest.mark.parametrize("name", ["linear", "cosine", "quad", "sigmoid"])
@pytest.mark.parametrize("T", [1000, 100, 50])
def test_schedule_matches_reference(name, T):
  s = schedules.make_schedule(name, T)
  assert s.num_timesteps == T
  ref = ref_constants(ref_betas(name, T))
  for key, val in ref.items():
    got = np.asarray(getattr(s, key))
    assert got.dtype == np.float32 and got.shape == (T,), key
    # Index 0 of the clipped log-variance is a copy of index 1 by definition.
    np.testing.assert_allclose(got, val.astype(np.float32), rtol=1e-6, atol=0,
                               err_msg=f"{name} {key}")


def test_linear_known_values():
  s = schedules.make_schedule("linear", 1000)
  assert float(s.betas[0]) == pytest.approx(1e-4, rel=1e-6)
  assert float(s.betas[-1]) == pytest.approx(0.02, rel=1e-6)
  assert float(s.alphas_cumprod[-1]) == pytest.approx(4.036e-5, rel=1e-3)
  # The posterior variance at index 0 is exactly zero (x_0 is given).
  assert float(s.posterior_variance[0]) == 0.0


def test_cosine_clipped_and_monotone():
  s = schedules.make_schedule("cosine", 1000)
  assert float(np.max(s.betas)) == pytest.approx(0.999, rel=1e-6)
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_schedule_is_a_pytree_through_jit():
  s = schedules.make_schedule("linear", 50)
  out = jax.jit(lambda sch: sch.betas.sum() + sch.num_timesteps)(s)
  assert float(out) == pytest.approx(float(np.sum(ref_betas("linear", 50))) + 50, rel=1e-5)


def test_unknown_name_lists_valid():
  with pytest.raises(ValueError, match="linear, cosine, quad, sigmoid"):
    schedules.make_schedule("cosin", 1000)


@pytest.mark.parametrize("T", [0, 1, 2.5])
def test_bad_num_timesteps(T):
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.make_schedule("linear", T)


def test_small_T_linear_is_a_clear_error():
  with pytest.raises(ValueError, match="use more timesteps"):
    schedules.make_schedule("linear", 10)
  schedules.make_schedule("cosine", 10)  # fine


def test_bad_kwargs_and_betas():
  with pytest.raises(ValueError, match="Bad arguments"):
    schedules.make_schedule("linear", 10, s=0.1)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    schedules.schedule_from_betas(np.array([0.1, 1.5]))
