"""Guidance distillation (Meng et al. 2023): the scale input, the stage-1 loss
against a float64 oracle, the guided sampler in one pass, and stage 1 plus a
round end to end on a tiny class-conditional teacher."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill as distill_config
from configs import test as test_config
from diffusion_jax import (builders, checkpointing, config_lib, evaluate, generation, guidance,
                           models, parallel, sample, samplers, schedules)
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.convert import workdir_io
from diffusion_jax.distill import guided, rounds
from tests.conftest import perturbed_params

MU = np.array([0.4, -0.3])  # class c: x ~ N(MU[c], S^2) per pixel; unconditional: N(0, S^2)
S = 0.5


def _class_config(digits_dir, **model):
  config = test_config.get_config()
  config.data.data_dir = digits_dir
  config.data.num_classes = config.model.num_classes = 10
  config.conditioning.type, config.conditioning.p_uncond = "class", 0.2
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  # At 32 channels GroupNorm(32) would erase an embedding added as a bias.
  config.model.scale_shift_norm = True
  config.model.update(model)
  config.training.batch_size = 16
  config.sample.thresholding = "static"
  return config


def test_the_scale_input_starts_at_zero_and_then_matters(digits_dir):
  config = _class_config(digits_dir, guidance_embed=True)
  model = models.create_model(config.model, config.data.channels)
  params = perturbed_params(model, config)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  t, labels = jnp.array([3, 200, 500, 999]), jnp.array([0, 1, 2, 3])
  run = jax.jit(lambda p, s: model.apply(
      {"params": p}, x, t, {"label": labels, "guidance": jnp.full((4,), s)}, train=False))
  # Zero-initialised last layer: the scale does not change the output ...
  zeroed = dict(params, guidance_emb=dict(params["guidance_emb"], dense1=jax.tree.map(
      jnp.zeros_like, params["guidance_emb"]["dense1"])))
  plain = models.create_model(dict(config.model, guidance_embed=False), config.data.channels)
  without = {k: v for k, v in params.items() if k != "guidance_emb"}
  ref = jax.jit(plain.apply, static_argnames="train")({"params": without}, x, t,
                                                      {"label": labels}, train=False)
  np.testing.assert_array_equal(run(zeroed, 1.0), ref)  # the teacher it was copied from
  np.testing.assert_array_equal(run(zeroed, 3.0), ref)
  # ... until it is trained (here: perturbed).
  assert float(jnp.max(jnp.abs(run(params, 3.0) - run(params, 1.0)))) > 1e-3
  with pytest.raises(ValueError, match="guidance"):
    model.apply({"params": params}, x, t, {"label": labels}, train=False)
  with pytest.raises(ValueError, match="must be a float"):
    model.apply({"params": params}, x, t, {"label": labels, "guidance": labels}, train=False)


def _oracle_eps(z, abar, mu):
  """The exact eps of x ~ N(mu, S^2) at z_t (float64)."""
  a = np.sqrt(abar)
  x0 = mu + a * S**2 / (abar * S**2 + 1.0 - abar) * (z - a * mu)
  return (z - a * x0) / np.sqrt(1.0 - abar)


def test_stage1_loss_matches_a_float64_oracle_and_the_guided_map_is_its_fixed_point():
  schedule = schedules.make_schedule("linear", 1000)
  abar_all = np.asarray(schedule.alphas_cumprod, np.float64)
  b, rng = 64, jax.random.key(3)
  labels = jnp.arange(b) % 2
  scales = jnp.linspace(1.0, 4.0, b)
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, 4, 4, 1)), jnp.float32)
  mu_of = lambda lab: jnp.where(lab < 2, jnp.asarray(MU, jnp.float32)[jnp.minimum(lab, 1)],
                                0.0)[:, None, None, None]

  def teacher(x, t, c):  # eps of class c's Gaussian; the null class (2) is N(0, S^2)
    abar = jnp.asarray(abar_all, jnp.float32)[t][:, None, None, None]
    m = mu_of(c["label"])
    a = jnp.sqrt(abar)
    x0_ = m + a * S**2 / (abar * S**2 + 1.0 - abar) * (x - a * m)
    return (x - a * x0_) / jnp.sqrt(1.0 - abar)

  guided_fn = guidance.guided_cond_denoiser(teacher, {"label": labels},
                                            {"label": jnp.full((b,), 2)}, scales)
  student_v = jnp.float32(0.1)  # a student that predicts v = 0.1 everywhere
  loss = guided.stage1_loss(lambda x, t: jnp.full(x.shape, student_v), guided_fn, schedule,
                            x0, rng, teacher_prediction="eps")
  # The same loss in float64 numpy, drawing the same t and noise.
  t_rng, noise_rng = jax.random.split(rng)
  t = np.asarray(jax.random.randint(t_rng, (b,), 0, 1000))
  eps = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64)
  abar = abar_all[t][:, None, None, None]
  xs = np.asarray(x0, np.float64)
  z = np.sqrt(abar) * xs + np.sqrt(1 - abar) * eps
  lab, s = np.asarray(labels), np.asarray(scales, np.float64)[:, None, None, None]
  e_c = _oracle_eps(z, abar, MU[lab][:, None, None, None])
  e_u = _oracle_eps(z, abar, 0.0)
  e = e_u + s * (e_c - e_u)
  target = np.clip((z - np.sqrt(1 - abar) * e) / np.sqrt(abar), -1, 1)
  x0_hat = np.sqrt(abar) * z - np.sqrt(1 - abar) * 0.1  # x0 of v = 0.1
  want = np.maximum(abar / (1 - abar), 1.0)[:, 0, 0, 0] * np.mean(
      (target - x0_hat) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-4, atol=1e-6)
  # A student whose v is exactly that of the guided teacher's thresholded x0 scores 0.
  def exact(x, tt):
    ab = jnp.asarray(abar_all, jnp.float32)[tt][:, None, None, None]
    e_g = guided_fn(x, tt)
    x0_g = jnp.clip((x - jnp.sqrt(1 - ab) * e_g) / jnp.sqrt(ab), -1, 1)
    return (jnp.sqrt(ab) * x - x0_g) / jnp.sqrt(1 - ab)  # v whose x0 is x0_g
  zero = guided.stage1_loss(exact, guided_fn, schedule, x0, rng, teacher_prediction="eps")
  assert float(jnp.max(zero)) < 1e-8 * float(jnp.max(loss)) + 1e-9


def test_student_cond_draws_scales_in_range():
  cond = guided.student_cond(jnp.arange(1000) % 10, jax.random.key(0), (1.0, 3.0))
  g = np.asarray(cond["guidance"])
  assert g.min() >= 1.0 and g.max() <= 3.0 and abs(g.mean() - 2.0) < 0.05
  assert guided.student_cond(jnp.arange(4), jax.random.key(0))["label"].shape == (4,)
  assert guided.student_cond(None, jax.random.key(0), (1.0, 3.0)) is None


@pytest.fixture(scope="module")
def cond_teacher(digits_dir, tmp_path_factory):
  """A tiny class-conditional, guidable digits U-Net (perturbed weights) as a workdir."""
  workdir = str(tmp_path_factory.mktemp("cond_teacher"))
  config = _class_config(digits_dir)
  model = models.create_model(config.model, config.data.channels)
  workdir_io.write_workdir(config, jax.device_get(perturbed_params(model, config)), workdir)
  return workdir


def _guided_config(teacher_dir, **distill):
  config = distill_config.get_config(teacher_dir)
  config.training.checkpoint_every_steps = 1000  # each stage saves once, at its end
  # Stage 1 trains enough to be measured; the round only has to run.
  config.distill.update(dict(teacher_steps=4, final_steps=2, steps_per_round=4,
                             guided_steps=40, lr=2e-3, batch_size=16), **distill)
  return config


def _stage1_error(student_dir, teacher_dir):
  """Stage 1's loss of a student on fixed data, labels and scales."""
  cfg, tcfg = checkpointing.load_config(student_dir), checkpointing.load_config(teacher_dir)
  model, params, _, _ = builders.restore_ema(cfg, student_dir)
  tmodel, tparams, _, _ = builders.restore_ema(tcfg, teacher_dir)
  x0 = jax.random.uniform(jax.random.key(5), (64, 16, 16, 1), minval=-1.0, maxval=1.0)
  cond = guided.student_cond(jnp.arange(64) % 10, jax.random.key(7), (1.0, 3.0))
  teacher = guidance.guided_cond_denoiser(
      lambda x, t, c: tmodel.apply({"params": tparams}, x, t, c, train=False),
      {"label": cond["label"]}, {"label": jnp.full((64,), 10)}, cond["guidance"])
  student = lambda x, t: model.apply({"params": params}, x, t, cond, train=False)
  loss = jax.jit(lambda: guided.stage1_loss(student, teacher, builders.make_schedule(cfg), x0,
                                            jax.random.key(6), teacher_prediction="eps"))
  return float(jnp.mean(loss()))


def test_guided_distillation_end_to_end(cond_teacher, tmp_path):
  workdir = str(tmp_path / "students")
  config = _guided_config(cond_teacher)
  records = rounds.distill(config, workdir)
  assert [(r["stage"], r["student_steps"]) for r in records] == [("guided", 4), ("steps_2", 2)]
  stage1 = os.path.join(workdir, rounds.GUIDED_DIR)
  # Stage 1 lowers its loss from the copied teacher's (the scale has no effect yet).
  start = str(tmp_path / "start")
  rcfg = rounds.round_config(config, 4, 40)
  teacher_params = builders.restore_ema(checkpointing.load_config(cond_teacher),
                                        cond_teacher)[1]
  workdir_io.write_workdir(rcfg, rounds._student_params(jax.device_get(teacher_params), rcfg),
                           start)
  before, after = _stage1_error(start, cond_teacher), _stage1_error(stage1, cond_teacher)
  assert after < 0.7 * before, (before, after)
  # The round's student is an ordinary workdir: guided in one pass, at any trained scale.
  round_dir = os.path.join(workdir, "steps_2")
  scfg = checkpointing.load_config(round_dir)
  assert (scfg.model.guidance_embed, scfg.conditioning.p_uncond) == (True, 0.0)
  scfg.sample.num_samples, scfg.sample.batch_size, scfg.sample.guidance_scale = 8, 8, 2.5
  scfg.sample.labels = "3"
  path = sample.sample_and_save(scfg, round_dir)
  out = np.load(path)
  assert out["arr_0"].shape == (8, 16, 16, 1)
  scfg.sample.guidance_scale = 5.0
  with pytest.raises(ValueError, match=r"learnt scales in \[1.0, 3.0\]"):
    sample.sample_and_save(scfg, round_dir)
  scfg.sample.guidance_scale, scfg.eval.metrics = 2.0, ("bpd",)
  assert "no likelihood" in evaluate.evaluate(scfg, round_dir)["skipped"]["bpd"]
  with open(os.path.join(workdir, rounds.ROUNDS_FILE)) as f:
    assert [json.loads(line)["train_steps"] for line in f] == [40, 4]
  assert rounds.distill(config, workdir) == records  # finished stages are skipped


def test_the_guidance_input_sampler_is_one_pass_of_the_scale(cond_teacher, tmp_path):
  config = rounds.round_config(_guided_config(cond_teacher), 2)
  model = models.create_model(config.model, config.data.channels)
  params = perturbed_params(model, config)
  mesh = parallel.make_mesh()
  sample_fn = generation.make_sample_fn(model, builders.make_schedule(config), config, 4, mesh)
  assert not sample_fn.guided
  cond = Conditioning(config).request(4, labels=np.array([0, 1, 2, 3])).cond
  rng = jax.random.key(0)
  got = sample_fn(params, rng, cond, guidance_scale=np.array([1.0, 2.0, 2.5, 3.0]))
  def denoise(x, t):
    c = {"label": jnp.asarray(cond["label"]), "guidance": jnp.array([1.0, 2.0, 2.5, 3.0])}
    return model.apply({"params": params}, x, t, c, train=False)
  want = samplers.sample(denoise, builders.make_schedule(config), (4, 16, 16, 1), rng,
                         method="ddim", num_steps=2, prediction="v", eta=0.0,
                         thresholding="static", timestep_spacing="nested")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="guided=False"):
    generation.make_sample_fn(model, builders.make_schedule(config), config, 4, mesh,
                              guided=True)
  with pytest.raises(ValueError, match="learnt scales"):
    sample_fn(params, rng, cond, guidance_scale=0.5)


def test_bad_guided_configs(cond_teacher):
  for change, needle in [(dict(guided_steps=0), "guided_steps"),
                         (dict(guidance_min=2.0), "outside"),
                         (dict(guidance_min=3.0, guidance_max=2.0), "guidance_min")]:
    with pytest.raises(ValueError, match=needle):
      rounds.validate(_guided_config(cond_teacher, **change))
  config = _guided_config(cond_teacher)
  config.conditioning.type = "text"
  with pytest.raises(ValueError, match="not implemented"):
    rounds.validate(config)
  config = _guided_config(cond_teacher)
  config.model.guidance_embed = True
  with pytest.raises(ValueError, match="already takes the guidance scale"):
    rounds.validate(config)
  student = rounds.round_config(_guided_config(cond_teacher), 2)
  with pytest.raises(ValueError, match="learns from a guided teacher"):  # --mode=train
    Conditioning(student).train({"label": jnp.zeros((2,), jnp.int32)}, jax.random.key(0),
                                builders.make_schedule(student))
  unconditional = test_config.get_config()
  unconditional.model.guidance_embed = True
  with pytest.raises(ValueError, match="needs a conditional model"):
    config_lib.validate(unconditional)
