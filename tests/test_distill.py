"""Progressive distillation: the maths against a Gaussian oracle, and a round end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill as distill_config
from configs import test as test_config
from diffusion_jax import builders, checkpointing, models, sample, samplers, schedules
from diffusion_jax.convert import workdir_io
from diffusion_jax.distill import progressive, rounds
from tests.conftest import perturbed_params

MU, S = 0.3, 0.5  # data x ~ N(MU, S^2) in every dimension


def _oracle_x0(z, abar):
  """E[x0 | z_t] for Gaussian data: the exact denoiser (float64 numpy)."""
  a = np.sqrt(abar)
  return MU + a * S**2 / (abar * S**2 + 1.0 - abar) * (z - a * MU)


def _ddim64(z, x0, abar, abar_next):
  return np.sqrt(abar_next) * x0 + np.sqrt(1 - abar_next) / np.sqrt(1 - abar) * (
      z - np.sqrt(abar) * x0)


def test_nested_grids_halve_exactly():
  for n in (64, 32, 8, 2):
    t, t_prev = samplers.step_timesteps(1000, n, "nested", "ddim")
    t2, _ = samplers.step_timesteps(1000, 2 * n, "nested", "ddim")
    np.testing.assert_array_equal(t, t2[::2])  # every other point of the finer grid
    np.testing.assert_array_equal(t_prev, np.append(t[1:], -1))
    assert t[0] == 999 and t[-1] == round(1000 / n) - 1


def test_two_step_target_is_one_ddim_step_to_the_teachers_end():
  """On the exact Gaussian denoiser (no clipping), one DDIM step with x~ lands
  where two teacher steps land, computed independently in float64."""
  schedule = schedules.make_schedule("linear", 1000)
  abar_np = np.asarray(schedule.alphas_cumprod, np.float64)
  teacher = lambda x, t: _oracle_x0_jax(x, schedule.alphas_cumprod[t])
  t, t_mid, abar, abar_mid, abar_end = (np.asarray(a) for a in progressive.student_grid(
      schedule, 4))
  z = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  target = np.asarray(progressive.two_step_target(
      teacher, jnp.asarray(z), jnp.asarray(t), jnp.asarray(t_mid), jnp.asarray(abar),
      jnp.asarray(abar_mid), jnp.asarray(abar_end), "x0", "none"), np.float64)
  for k in range(4):
    ab, ab_mid = abar_np[t[k]], abar_np[t_mid[k]]
    ab_end = abar_np[t[k + 1]] if k < 3 else 1.0
    z_mid = _ddim64(z[k].astype(np.float64), _oracle_x0(z[k], ab), ab, ab_mid)
    z_end = _ddim64(z_mid, _oracle_x0(z_mid, ab_mid), ab_mid, ab_end)
    one = _ddim64(z[k].astype(np.float64), target[k], ab, ab_end)
    np.testing.assert_allclose(one, z_end, rtol=2e-4, atol=2e-5)


def _oracle_x0_jax(x, abar):
  a = jnp.sqrt(abar)[:, None]
  return MU + a * S**2 / (a**2 * S**2 + 1.0 - a**2) * (x - a * MU)


def test_a_student_equal_to_the_two_step_map_is_a_fixed_point_of_the_loss():
  """Gaussian data: the student x^(z) = a_k z + b_k with the exact coefficients of
  the teacher's two-step map has zero loss and zero gradient; others do not."""
  schedule = schedules.make_schedule("linear", 1000)
  n = 4
  t, t_mid, abar, abar_mid, abar_end = (np.asarray(a, np.float64) for a in
                                        progressive.student_grid(schedule, n))
  abar_np = np.asarray(schedule.alphas_cumprod, np.float64)
  a_star, b_star = [], []
  for k in range(n):  # the affine map z -> x~, from two points of it
    ends = []
    for z in (0.0, 1.0):
      z_mid = _ddim64(z, _oracle_x0(z, abar[k]), abar[k], abar_mid[k])
      z_end = _ddim64(z_mid, _oracle_x0(z_mid, abar_mid[k]), abar_mid[k], abar_end[k])
      r = np.sqrt(1 - abar_end[k]) / np.sqrt(1 - abar[k])
      ends.append((z_end - r * z) / (np.sqrt(abar_end[k]) - r * np.sqrt(abar[k])))
    a_star.append(ends[1] - ends[0])
    b_star.append(ends[0])
  coef = jnp.asarray(np.stack([a_star, b_star], 1), jnp.float32)  # [n, 2]
  index = {int(ti): k for k, ti in enumerate(t)}
  lookup = jnp.zeros(1000, jnp.int32).at[jnp.asarray(list(index))].set(
      jnp.asarray(list(index.values())))
  teacher = lambda x, tt: _oracle_x0_jax(x, schedule.alphas_cumprod[tt])
  x0 = MU + S * jax.random.normal(jax.random.key(1), (256, 8))

  def loss(c):
    student = lambda z, tt: c[lookup[tt], 0][:, None] * z + c[lookup[tt], 1][:, None]
    return jnp.mean(progressive.loss(student, teacher, schedule, x0, jax.random.key(2), n,
                                     teacher_prediction="x0", student_prediction="x0",
                                     thresholding="none"))

  value, grad = jax.value_and_grad(loss)(coef)
  assert float(value) < 1e-9 and float(jnp.abs(grad).max()) < 1e-5
  assert float(loss(coef + 0.01)) > 1e-5  # a nearby student is penalised


@pytest.fixture(scope="module")
def teacher(digits_dir, tmp_path_factory):
  """A tiny digits U-Net with perturbed weights, written as a workdir."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = test_config.get_config()
  config.data.data_dir = digits_dir
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.training.batch_size = 16
  model = models.create_model(config.model, config.data.channels)
  workdir_io.write_workdir(config, jax.device_get(perturbed_params(model, config)), workdir)
  return workdir


def _distill_config(teacher_dir, **distill):
  config = distill_config.get_config(teacher_dir)
  config.distill.update(dict(teacher_steps=4, final_steps=2, steps_per_round=40, lr=2e-3,
                             batch_size=16), **distill)
  return config


def _student_error(round_dir, teacher_dir):
  """The distillation loss of a round's EMA student on fixed noise and data."""
  cfg = checkpointing.load_config(round_dir)
  model, params, _, _ = builders.restore_ema(cfg, round_dir)
  tcfg = checkpointing.load_config(teacher_dir)
  tmodel, tparams, _, _ = builders.restore_ema(tcfg, teacher_dir)
  schedule = builders.make_schedule(cfg)
  x0 = jax.random.uniform(jax.random.key(5), (64, 16, 16, 1), minval=-1.0, maxval=1.0)
  fn = lambda m, p: (lambda x, t: m.apply({"params": p}, x, t, None, train=False))
  loss = jax.jit(lambda: progressive.loss(fn(model, params), fn(tmodel, tparams), schedule,
                                          x0, jax.random.key(6), cfg.sample.num_steps,
                                          teacher_prediction=tcfg.diffusion.prediction))
  return float(jnp.mean(loss()))


def test_a_round_reduces_the_error_and_its_student_is_an_ordinary_workdir(teacher, tmp_path):
  workdir = str(tmp_path / "student")
  config = _distill_config(teacher)
  rounds_dir = os.path.join(workdir, "steps_2")
  records = rounds.distill(config, workdir)
  assert [r["student_steps"] for r in records] == [2]
  after = _student_error(rounds_dir, teacher)
  # The same student before training: the teacher's weights read as v-prediction.
  start = str(tmp_path / "start")
  workdir_io.write_workdir(rounds.round_config(config, 2), jax.device_get(
      builders.restore_ema(checkpointing.load_config(teacher), teacher)[1]), start)
  before = _student_error(start, teacher)
  assert after < 0.7 * before, (before, after)  # measured: 0.65 -> 0.38
  # Finished rounds are skipped: nothing more is trained or recorded.
  assert rounds.distill(config, workdir) == records
  # Sample mode on the student: DDIM with its 2 steps on the nested grid.
  scfg = checkpointing.load_config(rounds_dir)
  assert (scfg.sample.method, scfg.sample.num_steps, scfg.sample.timestep_spacing,
          scfg.diffusion.prediction) == ("ddim", 2, "nested", "v")
  scfg.sample.num_samples, scfg.sample.batch_size = 8, 8
  path = sample.sample_and_save(scfg, rounds_dir)
  images = np.load(path)["arr_0"]
  assert images.shape == (8, 16, 16, 1)
  with open(os.path.join(workdir, rounds.ROUNDS_FILE)) as f:
    assert json.loads(f.readline())["train_steps"] == 40


def test_bad_distill_configs(teacher):
  for change, needle in [(dict(teacher_steps=6), "power of two"),
                         (dict(final_steps=4), "power of two"),
                         (dict(method="consistency"), "distill.method"),
                         (dict(teacher_steps=2048), "exceeds")]:
    with pytest.raises(ValueError, match=needle) as err:
      rounds.validate(_distill_config(teacher, **change))
    assert str(err.value).startswith("Bad config: ") and str(err.value).count("Bad config") == 1
  config = _distill_config(teacher)
  config.sample.thresholding = "dynamic"
  with pytest.raises(ValueError, match="thresholding"):
    rounds.validate(config)
  config = _distill_config(teacher)
  config.model.low_res_channels = 1
  with pytest.raises(ValueError, match="not implemented"):
    rounds.validate(config)
