"""The digits quality measure and --mode=eval end to end, on a tiny trained run."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from diffusion_jax import (builders, checkpointing, default_config, evaluate,
                           input_pipeline, likelihood, models, parallel, train)
from diffusion_jax.evaluation import (digits_classifier, digits_quality, inception,
                                      inception_metrics, stats)
from tests.test_evaluation import random_inception_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def clf(digits_dir):
  """Trained once per data dir (about 4 s), then read from its cache."""
  return digits_classifier.DigitsClassifier.load_or_train(digits_dir)


def test_digits_classifier_is_accurate_cached_and_deterministic(clf, digits_dir):
  assert clf.test_accuracy >= 0.96 and clf.meta["num_test"] == 300
  again = digits_classifier.DigitsClassifier.load_or_train(digits_dir)  # from the cache
  images, _ = digits_classifier.load_digits_split(digits_dir, "test")
  np.testing.assert_array_equal(again.predict_proba(images), clf.predict_proba(images))
  assert clf.features(images).shape == (300, digits_classifier.FEATURE_DIM)
  np.testing.assert_allclose(clf.predict_proba(images[:7]).sum(axis=1), 1.0)


def test_digits_quality_separates_real_digits_from_noise(clf, digits_dir):
  real, labels = digits_classifier.load_digits_split(digits_dir, "train")
  good = digits_quality.digits_quality(real[:1000], clf, digits_dir, labels=labels[:1000])
  assert good["class_accuracy"] == 1.0  # training digits, seen by the classifier
  assert good["frechet_distance"] < 3 * good["floor_frechet_distance"]
  # 1,000 real TRAIN digits are what the same-n floor draws: a ratio near 1.
  assert good["floor_num_samples"] == 1000 and good["floor_draws"] == digits_quality.FLOOR_DRAWS
  assert 0.7 < good["frechet_distance_ratio"] < 1.4
  assert good["confident_fraction"] > 0.95 and good["precision"] > 0.85
  assert len(good["class_histogram"]) == 10 and min(good["class_histogram"]) > 0.05
  noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 1), dtype=np.uint8)
  bad = digits_quality.digits_quality(noise, clf, digits_dir)
  assert bad["frechet_distance"] > 50 * good["floor_frechet_distance"]
  assert bad["precision"] == 0.0 and "class_accuracy" not in bad
  with pytest.warns(stats.NotComparableWarning):
    few = digits_quality.digits_quality(real[:30], clf, digits_dir)
  assert "NOT comparable" in few["warning"]


def test_same_n_floor_matches_direct_draws_and_grows_as_n_falls(clf, digits_dir):
  """The floor is real TRAIN digits of the samples' count; the FD bias grows as n falls."""
  train, _ = digits_classifier.load_digits_split(digits_dir, "train")
  test, _ = digits_classifier.load_digits_split(digits_dir, "test")
  real = digits_quality._real_reference(clf, digits_dir)  # pylint: disable=protected-access
  small = digits_quality.same_n_floor(real, 256)
  # Recomputed from the images (not the cached features), one draw per seed.
  test_stats = stats.feature_statistics(clf.features(test).astype(np.float64))
  direct = [stats.stats_distance(stats.feature_statistics(clf.features(
      train[np.sort(np.random.default_rng(s).choice(len(train), 256, replace=False))]
  ).astype(np.float64)), test_stats) for s in range(digits_quality.FLOOR_DRAWS)]
  np.testing.assert_allclose(small["floor_frechet_distance"], np.mean(direct), rtol=1e-6)
  np.testing.assert_allclose(small["floor_frechet_distance_std"], np.std(direct), rtol=1e-6)
  whole = digits_quality.same_n_floor(real, 5000)  # capped at the split: one draw
  assert whole["floor_num_samples"] == len(train) and whole["floor_draws"] == 1
  np.testing.assert_allclose(whole["floor_frechet_distance"],
                             real["floor_frechet_distance_all_train"], rtol=1e-12)
  assert small["floor_frechet_distance"] > 1.2 * whole["floor_frechet_distance"]


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
  """Two training steps of configs/test.py: one checkpoint, at step 2.

  With one U-Net level and no attention, which halves the compile time.
  """
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  config = test_config.get_config()
  config.data.data_dir = digits_dir
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.training.num_train_steps = 2
  config.training.sample_every_steps = 0
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _eval_config(config, **eval_overrides):
  config = config.copy_and_resolve_references()
  config.sample.num_steps = 3
  config.eval.update(dict(num_samples=80, batch_size=40, bpd_batch_size=8,
                          bpd_max_examples=8, reference_max_examples=100,
                          pr_num_real=100), **eval_overrides)
  return config


def _library_bits_per_dim(config, workdir):
  """likelihood.bits_per_dim called directly on the eval split's first 8 examples."""
  model = models.create_model(config.model, 1)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  params, _ = ckpt.restore_ema_params(
      builders.abstract_params(model, config, parallel.make_mesh(jax.devices()[:1])))
  ckpt.close()
  x0 = next(input_pipeline.create_eval_iterator(config.data, 8))["image"]
  denoise = lambda x, t: model.apply({"params": params}, x, t, None, train=False)
  return likelihood.bits_per_dim(denoise, builders.make_schedule(config), x0,
                                 jax.random.fold_in(jax.random.key(config.eval.seed), 0))


def _fast_frechet(real_fn, calls):
  """stats.stats_distance, except for 2048-d Inception statistics.

  scipy's sqrtm of a 2048 x 2048 matrix takes 10-40 s on a 2-core CPU; the
  Frechet distance itself is tested against references in test_evaluation.py,
  so here the 2048-d call is recorded and answered with ||dmu||^2 + Tr S1 + Tr S2
  (its value when the square-root term is zero), enough to check the wiring.
  """
  def fn(a, b):
    if a.mu.shape[0] < 2048:
      return real_fn(a, b)
    calls.append((a, b))
    return float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma))
  return fn


def test_eval_mode_end_to_end(run, clf, tmp_path, monkeypatch):
  """All five metrics from one checkpoint: one sampler compile for the whole test."""
  config, workdir = run
  del clf  # trained (and cached) by the fixture; eval mode reads the cache
  weights = str(tmp_path / "inception_fid.npz")
  np.savez(weights, **random_inception_weights())
  # The same graph at its smallest input (75 px) keeps this fast; 299 in real use.
  monkeypatch.setattr(inception, "InceptionFeatures",
                      functools.partial(inception.InceptionFeatures, input_size=75))
  calls = []
  monkeypatch.setattr(stats, "stats_distance", _fast_frechet(stats.stats_distance, calls))
  config = _eval_config(config, inception_weights=weights)
  report = evaluate.evaluate(config, workdir)

  assert report["checkpoint_step"] == 2 and report["num_samples"] == 80
  assert report["sampler"]["method"] == "ddim" and report["sampler"]["num_steps"] == 3
  conditional = {"caption_accuracy", "psnr_ssim"}  # not for an unconditional digits model
  assert set(report["skipped"]) == conditional
  assert set(report["metrics"]) == set(evaluate.METRICS) - conditional
  with open(report["report_file"]) as f:
    assert json.load(f)["metrics"] == report["metrics"]
  images = np.load(report["samples_file"])["arr_0"]
  assert images.shape == (80, 16, 16, 1) and images.dtype == np.uint8
  m = report["metrics"]
  digits = m["digits_fd"]
  assert digits["num_samples"] == 80 and np.isfinite(digits["frechet_distance"])
  # Inception metrics: features of the samples against a 100-image reference.
  (gen, ref), = calls
  assert gen.num_examples == 80 and ref.num_examples == 100 and m["fid"] > 0
  assert m["is"]["splits"] == 10 and m["is"]["mean"] >= 1.0
  assert 0 <= m["pr"]["precision"] <= 1 and m["pr"]["num_real"] == 100
  assert report["feature_network"]["weights_sha256"] == inception.file_sha256(weights)
  assert any("NOT comparable" in w for w in report["warnings"])  # 80 samples < 2048
  # The reference is cached in the workdir: the next eval reads the same file.
  path = report["reference"]["path"]
  assert os.path.dirname(path) == os.path.join(workdir, "eval")
  mtime = os.path.getmtime(path)
  _, _, info = inception_metrics.reference_stats(config, workdir,
                                                 inception.InceptionFeatures(weights))
  assert info["path"] == path and os.path.getmtime(path) == mtime
  # Bits/dim: finite, and the library function's value on the same examples and keys.
  bpd = m["bpd"]
  assert bpd["num_examples"] == 8 and np.isfinite(bpd["bits_per_dim"]) and bpd["bits_per_dim"] > 0
  want = float(np.mean(_library_bits_per_dim(config, workdir)))
  np.testing.assert_allclose(bpd["bits_per_dim"], want, rtol=1e-4)


def test_inception_metrics_are_skipped_without_weights(run):
  config, workdir = run
  report = {"metrics": {}, "skipped": {}}
  images = np.zeros((80, 16, 16, 1), np.uint8)
  inception_metrics.inception_metrics(_eval_config(config), workdir, images,
                                      ["fid", "is", "pr"], report)
  assert report["metrics"] == {} and set(report["skipped"]) == {"fid", "is", "pr"}
  assert "inception_weights" in report["skipped"]["fid"]


def test_eval_mode_errors(run, tmp_path):
  config, workdir = run
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoints"):
    evaluate.evaluate(_eval_config(config), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="inception_weights"):
    evaluate.evaluate(_eval_config(config, inception_weights=str(tmp_path / "x.npz")), workdir)
  with pytest.raises(FileNotFoundError, match="fid_reference"):
    evaluate.evaluate(_eval_config(config, fid_reference=str(tmp_path / "r.npz")), workdir)
  with pytest.raises(ValueError, match="Unknown eval metric"):
    evaluate.evaluate(_eval_config(config, metrics=("fid", "kid")), workdir)


def test_configs_saved_before_the_eval_section_get_its_defaults(run, tmp_path):
  config, workdir = run
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    saved = json.load(f)
  del saved["eval"]
  saved["sample"].pop("thresholding")
  saved["sample"]["clip_denoised"] = False  # the field thresholding replaced
  with open(tmp_path / checkpointing.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  old = checkpointing.load_config(str(tmp_path))
  assert old.eval.metrics == default_config.get_config().eval.metrics
  assert old.sample.thresholding == "none" and "clip_denoised" not in old.sample
  assert old.model.to_dict() == config.model.to_dict()


def test_main_eval_mode_on_a_workdir_without_checkpoints(tmp_path):
  out = subprocess.run([sys.executable, "-m", "diffusion_jax.main", "--mode=eval",
                        f"--workdir={tmp_path}", "--config=configs/test.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "No checkpoints" in out.stderr
