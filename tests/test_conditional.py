"""Class-conditional training and sampling end to end, and the bad-input errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from diffusion_jax import (builders, checkpointing, conditioning, config_lib, evaluate,
                           generation, guidance, input_pipeline, likelihood, models, optim,
                           parallel, sample, sample_io, train)
from diffusion_jax.train_state import TrainState
from diffusion_jax.evaluation import bpd
from tests.conftest import apply_overrides, perturbed_params


def _cond_config(data_dir, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.model.num_classes = 10
  config.conditioning.type = "class"
  config.conditioning.p_uncond = 0.1
  t = config.training
  t.num_train_steps, t.checkpoint_every_steps, t.sample_every_steps = 2, 2, 2
  t.log_every_steps, t.num_grid_samples = 1, 8
  config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 3, 10, 8
  return apply_overrides(config, **overrides)


@pytest.fixture(scope="module")
def cond_run(digits_dir, tmp_path_factory):
  """Two train steps of a class-conditional test config on 4 devices."""
  workdir = str(tmp_path_factory.mktemp("cond_run"))
  config = _cond_config(digits_dir, sample__guidance_scale=2.0)
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


class _SpyModel:
  """Stands in for the U-Net: records the labels the train step feeds it."""

  def __init__(self):
    self.seen = []

  def init(self, rng, x, t, cond, train):  # pylint: disable=unused-argument
    return {"params": {"w": jnp.ones(())}}

  def apply(self, variables, x, t, cond, train, rngs=None):  # pylint: disable=unused-argument
    jax.debug.callback(lambda lab: self.seen.append(np.asarray(lab)), cond["label"])
    return x * variables["params"]["w"]


def test_train_step_drops_labels_at_p_uncond(digits_dir):
  config = _cond_config(digits_dir, conditioning__p_uncond=0.2)
  spy, tx = _SpyModel(), optim.make_optimizer(config.optim, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = train.make_train_step(spy, builders.make_schedule(config), tx, config, mesh)
  params = {"w": jnp.ones(())}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params={"w": jnp.ones(())},
                     opt_state=tx.init(params))
  n = 8192
  labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int32)
  batch = {"image": np.zeros((n, 2, 2, 1), np.float32), "label": labels}
  for _ in range(3):
    state, _ = step(state, batch, jax.random.key(0))
  jax.effects_barrier()
  seen = np.stack(spy.seen)  # [3 steps, n]
  assert seen.shape == (3, n)
  dropped = seen == 10
  assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / dropped.size), dropped.mean()
  np.testing.assert_array_equal(seen[~dropped], np.broadcast_to(labels, seen.shape)[~dropped])
  assert not np.array_equal(dropped[0], dropped[1])  # a new draw every step


def test_conditional_run_and_sample_mode_writes_labels(cond_run):
  config, workdir, state = cond_run
  assert int(state.step) == 2
  assert os.path.exists(os.path.join(workdir, "grids", "step_00000002.png"))
  cfg = checkpointing.load_config(workdir)
  cfg.sample.labels, cfg.sample.num_samples, cfg.sample.name = "3,5", 10, "three_five"
  path = sample.sample_and_save(cfg, workdir)
  with np.load(path) as f:
    images, labels = f["arr_0"], f["labels"]
  assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [3, 5] * 5)
  assert os.path.exists(path[:-4] + ".png")


def test_guided_sampler_compiles_once_for_any_scale(digits_dir, tmp_path):
  # A small U-Net at 8x8 with random parameters keeps the compile short; ch 64
  # so GroupNorm(32) does not erase the class embedding (groups of 2 channels).
  config = _cond_config(digits_dir, data__image_size=8, model__ch=64, model__ch_mult=(1,),
                        model__attn_resolutions=(), model__patch_size=1)
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, 1)
  params = jax.jit(lambda x: model.init(jax.random.key(0), x, jnp.zeros(4, jnp.int32),
                                        conditioning.init_cond(config, 4), train=False))(
                                            jnp.zeros((4, 8, 8, 1)))["params"]
  # The output conv starts at zero: perturb every parameter so labels matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  # The U-Net guided in one batched call of 2B equals its two separate calls.
  apply = jax.jit(lambda x, t, cond: model.apply({"params": params}, x, t, cond, train=False))
  x, t = jax.random.normal(jax.random.key(2), (4, 8, 8, 1)), jnp.array([1, 50, 70, 99])
  lab = jnp.array([0, 3, 7, 9], jnp.int32)
  cond, uncond = apply(x, t, {"label": lab}), apply(x, t, {"label": jnp.full(4, 10)})
  assert float(jnp.abs(cond - uncond).max()) > 1e-3  # the label matters
  guided = jax.jit(guidance.guided_denoiser(apply, lab, 10, 2.5))(x, t)
  np.testing.assert_allclose(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)

  fn = generation.make_sample_fn(model, builders.make_schedule(config), config, 8, mesh,
                                 guided=True)
  labels = np.arange(12) % 10
  scales = [1.0, 3.0, np.linspace(0.0, 5.0, 12)]  # scalars and a per-sample array
  outs = [generation.generate(fn, params, 12, 8, seed=0, cond={"label": labels},
                              guidance_scale=s) for s in scales]
  assert fn.jitted._cache_size() == 1
  assert all(o.shape == (12, 8, 8, 1) for o in outs)
  assert not np.array_equal(outs[0], outs[1])
  grid = sample_io.save_grid(str(tmp_path / "rows.png"), outs[1], labels)
  assert grid.shape[0] == 10 * 9 + 1  # one row per class: 8 px + 1 px padding each
  assert os.path.exists(tmp_path / "rows.png")
  plain = generation.make_sample_fn(model, builders.make_schedule(config), config, 8, mesh,
                                    guided=False)
  with pytest.raises(ValueError, match="built without guidance"):
    plain(params, jax.random.key(0), {"label": labels[:8]}, 2.0)


def test_class_index_out_of_range(cond_run):
  _, workdir, _ = cond_run
  cfg = checkpointing.load_config(workdir)
  cfg.sample.labels = "2,10"
  with pytest.raises(ValueError, match="Class index 10 is out of range.*0 to 9"):
    sample.sample_and_save(cfg, workdir)


def test_labels_asked_of_an_unconditional_checkpoint(digits_dir, tmp_path):
  config = test_config.get_config()
  config.data.data_dir = digits_dir
  checkpointing.save_config(str(tmp_path), config)  # what an unconditional run leaves
  config.sample.labels = "3"
  with pytest.raises(ValueError, match="unconditional.*cannot generate chosen classes"):
    sample.sample_and_save(config, str(tmp_path))
  config.sample.labels, config.sample.guidance_scale = "", 3.0
  with pytest.raises(ValueError, match="needs a class- or text-conditional model"):
    sample.sample_and_save(config, str(tmp_path))


def test_guidance_without_conditioning_dropout(digits_dir, tmp_path):
  trained = _cond_config(digits_dir, conditioning__p_uncond=0.0)
  checkpointing.save_config(str(tmp_path), trained)
  # The sampling config claims dropout; the checkpoint's own config decides.
  config = _cond_config(digits_dir, sample__guidance_scale=3.0)
  with pytest.raises(ValueError, match="trained without conditioning dropout"):
    sample.sample_and_save(config, str(tmp_path))
  with pytest.raises(ValueError, match="sample.guidance_scale=3.0 needs a class- or text-conditional "
                     "model trained with conditioning dropout"):
    config_lib.validate(_cond_config(digits_dir, conditioning__p_uncond=0.0,
                                     sample__guidance_scale=3.0))


def test_config_errors(digits_dir):
  bad = _cond_config(digits_dir, model__num_classes=5)
  with pytest.raises(ValueError, match="model.num_classes == data.num_classes > 0; got "
                     "model.num_classes=5, data.num_classes=10"):
    train.Trainer(bad, "/nonexistent/never/written")
  with pytest.raises(ValueError, match="set conditioning.type='class'"):
    config_lib.validate(_cond_config(digits_dir, conditioning__type="none"))
  with pytest.raises(ValueError, match="conditioning.type='text' needs data.caption_key"):
    config_lib.validate(_cond_config(digits_dir, conditioning__type="text",
                                     model__num_classes=0))
  with pytest.raises(ValueError, match="p_uncond must be in"):
    config_lib.validate(_cond_config(digits_dir, conditioning__p_uncond=1.0))
  with pytest.raises(ValueError, match="Class index 11"):
    config_lib.validate(_cond_config(digits_dir, sample__labels="11"))
  with pytest.raises(ValueError, match="sample.thresholding='soft'"):
    config_lib.validate(_cond_config(digits_dir, sample__thresholding="soft"))
  unconditional = test_config.get_config()
  unconditional.sample.labels = "all"
  with pytest.raises(ValueError, match="needs conditioning.type='class'"):
    config_lib.validate(unconditional)


def _eval_overrides(config, **overrides):
  """The run's config with a small eval: 16 samples, 8 bits/dim examples."""
  return apply_overrides(config.copy_and_resolve_references(), eval__num_samples=16,
                         eval__batch_size=8, eval__bpd_batch_size=8, eval__bpd_max_examples=8,
                         **overrides)


def test_eval_mode_on_a_class_model(cond_run):
  """Samples of the eval split's labels; per-class figures; bits/dim given each label."""
  config, workdir, _ = cond_run
  config = _eval_overrides(config, eval__metrics=("digits_fd", "caption_accuracy", "bpd"))
  report = evaluate.evaluate(config, workdir)
  assert report["conditioned_on"] == "class labels"
  assert set(report["metrics"]) == {"digits_fd", "bpd"}
  assert "text-conditioned" in report["skipped"]["caption_accuracy"]
  first = next(input_pipeline.create_eval_iterator(config.data, 16))
  saved = np.load(report["samples_file"])
  np.testing.assert_array_equal(saved["labels"], first["label"])  # the split's own labels
  digits = report["metrics"]["digits_fd"]
  per_class = digits["per_class"]
  assert [row["class"] for row in per_class] == list(range(10))
  assert [row["num_samples"] for row in per_class] == list(np.bincount(first["label"], minlength=10))
  assert 0.0 <= digits["class_accuracy"] <= 1.0
  # bits/dim conditioned on each example's label: the library, one timestep per call.
  model, params, _, mesh = builders.restore_ema(config, workdir)
  x0, labels = first["image"][:8], jnp.asarray(first["label"][:8])

  def library(params, labels):
    fn = lambda x, t: model.apply({"params": params}, x, t, {"label": labels}, train=False)
    return float(np.mean(likelihood.bits_per_dim(
        fn, builders.make_schedule(config), x0,
        jax.random.fold_in(jax.random.key(config.eval.seed), 0), chunk_size=1)))
  np.testing.assert_allclose(report["metrics"]["bpd"]["bits_per_dim"], library(params, labels),
                             rtol=1e-4)
  # Two train steps leave the labels all but unused: perturbed weights show they are.
  perturbed = perturbed_params(model, config)
  mine = bpd.bits_per_dim_on_split(model, perturbed, config, mesh,
                                   conditioning.Conditioning(config))["bits_per_dim"]
  np.testing.assert_allclose(mine, library(perturbed, labels), rtol=1e-4)
  assert abs(mine - library(perturbed, jnp.full(8, 10))) > 1e-3  # the null class differs
