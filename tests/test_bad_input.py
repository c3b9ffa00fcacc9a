"""Bad input gives an early, clear error: one test per row of docs/reliability.md.

Each row asserts the error type and a distinctive part of the message. Config
rows need no training; the sample- and eval-mode rows share one tiny trained
workdir (two steps, one checkpoint at step 2); the CLI rows run main in
subprocesses, all three at once.
"""
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import cascade as cascade_config
from configs import from_workdir, shapes_sr32, shapes_text_glide
from configs import test as test_config
from diffusion_jax import (builders, cascade, checkpointing, config_lib, evaluate, guidance,
                           generation, models, parallel, sample, train)
from diffusion_jax.evaluation import inception, npz_io, precision_recall, stats
from diffusion_jax.conditioning import Conditioning
from tests.conftest import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base(kind: str = "uncond", **overrides) -> ml_collections.ConfigDict:
  """configs/test.py, optionally class-conditional (10 digits, p_uncond 0.1)."""
  config = test_config.get_config()
  if kind == "class":
    config.model.num_classes, config.conditioning.type = 10, "class"
  return apply_overrides(config, **overrides)


# ---------------------------------------------------------------------------
# Config values (config_lib.validate, as train mode runs it first).

CONFIG_ROWS = {
    "data_channels": ({"data__channels": 2}, "data.channels=2; valid values: 1, 3."),
    "image_size": ({"data__image_size": 0}, "data.image_size must be > 0, got 0."),
    "schedule": ({"diffusion__schedule": "exp"}, "diffusion.schedule='exp'; valid values: "),
    "num_timesteps": ({"diffusion__num_timesteps": 1}, "diffusion.num_timesteps must be >= 2"),
    "prediction": ({"diffusion__prediction": "score"},
                   "diffusion.prediction='score'; valid values: eps, x0, v."),
    "min_snr_gamma": ({"diffusion__weighting": "min_snr", "diffusion__min_snr_gamma": 0.0},
                      "diffusion.weighting='min_snr' needs diffusion.min_snr_gamma > 0"),
    "optimizer": ({"optim__optimizer": "sgd"}, "optim.optimizer='sgd'; valid values: adam"),
    "lr": ({"optim__lr": 0.0}, "optim.lr must be > 0, got 0.0."),
    "warmup_steps": ({"optim__warmup_steps": -1}, "optim.warmup_steps must be >= 0, got -1."),
    "grad_clip_norm": ({"optim__grad_clip_norm": -1.0}, "optim.grad_clip_norm must be >= 0"),
    "adam_b2": ({"optim__b2": 1.0}, "optim.b2 must be in [0, 1) (Adam's bias correction"),
    "ema_decay": ({"optim__ema_decay": 1.0}, "optim.ema_decay must be in [0, 1), got 1.0."),
    "train_batch_size": ({"training__batch_size": 0}, "training.batch_size must be > 0, got 0."),
    "num_train_steps": ({"training__num_train_steps": -1},
                        "training.num_train_steps must be > 0, got -1."),
    "num_grid_samples": ({"training__num_grid_samples": 0},
                         "training.num_grid_samples must be > 0 when training grids are on"),
    "fsdp_axis_size": ({"parallel__fsdp_axis_size": 0}, "parallel.fsdp_axis_size must be >= 1"),
    "sample_method": ({"sample__method": "euler"},
                      "sample.method='euler'; valid values: ancestral, ddim, dpm_solver++."),
    "sample_num_steps": ({"sample__num_steps": 5000},
                         "sample.num_steps=5000 must be in [0, diffusion.num_timesteps=100]"),
    "dpm_one_step": ({"sample__method": "dpm_solver++", "sample__num_steps": 1},
                     "sample.method=dpm_solver++ needs sample.num_steps >= 2."),
    "num_samples_zero": ({"sample__num_samples": 0},
                         "sample.num_samples and sample.batch_size must be > 0."),
    "sample_batch_negative": ({"sample__batch_size": -8},
                              "sample.num_samples and sample.batch_size must be > 0."),
    "eta_negative": ({"sample__eta": -0.5}, "sample.eta must be >= 0 (0 is deterministic DDIM)"),
    "checkpoint_step_negative": ({"sample__checkpoint_step": -2},
                                 "sample.checkpoint_step must be a step or -1 (the latest)"),
    "thresholding": ({"sample__thresholding": "soft"},
                     "sample.thresholding='soft'; valid values: none, static, dynamic."),
    "timestep_spacing": ({"sample__timestep_spacing": "even"},
                         "sample.timestep_spacing='even'; valid values: uniform, linspace, "
                         "leading, trailing, nested."),
    "ddim_eps": ({"sample__ddim_eps": "unclipped"},
                 "sample.ddim_eps='unclipped'; valid values: clipped, raw."),
    "spacing_dpm_solver": ({"sample__method": "dpm_solver++",
                            "sample__timestep_spacing": "leading"},
                           "sample.timestep_spacing='leading' is for sample.method 'ancestral' or "
                           "'ddim'; dpm_solver++ steps on its own log-SNR grid"),
    "trailing_artefact": ({"sample__timestep_spacing": "trailing", "sample__num_steps": 29},
                          "sample.timestep_spacing='trailing' with num_steps=29 of 100: diffusers' "
                          "grid has 30 timesteps ending at -1"),
    "threshold_percentile": ({"sample__dynamic_threshold_percentile": 0.0},
                             "sample.dynamic_threshold_percentile must be in (0, 100]"),
    "guidance_negative": ({"sample__guidance_scale": -1.0},
                          "sample.guidance_scale must be >= 0, got -1.0."),
    "guidance_unconditional": ({"sample__guidance_scale": 3.0},
                               "sample.guidance_scale=3.0 needs a class- or text-conditional "
                               "model trained with conditioning dropout"),
    "labels_unconditional": ({"sample__labels": "7"},
                             "sample.labels='7' needs conditioning.type='class'"),
    "captions_unconditional": ({"sample__captions": "a red circle"},
                               "it cannot follow captions."),
    "conditioning_type": ({"conditioning__type": "image"},
                          "conditioning.type='image'; valid values: none, class, clip_text, text."),
    "p_uncond_one": ({"conditioning__p_uncond": 1.0}, "conditioning.p_uncond must be in [0, 1)"),
    "text_unet_without_text": ({"model__name": "text_unet"},
                               "model.name='text_unet' needs conditioning.type='text'."),
    "low_res_size_alone": ({"data__low_res_size": 8},
                           "a super-resolution stage sets both (low_res_channels = "),
}

CLASS_CONFIG_ROWS = {
    "num_classes_mismatch": ({"model__num_classes": 5},
                             "needs model.num_classes == data.num_classes > 0; got "
                             "model.num_classes=5, data.num_classes=10."),
    "labels_unparsable": ({"sample__labels": "cat,dog"},
                          "a comma-separated list such as '1,3,5'."),
    "labels_out_of_range": ({"sample__labels": "12"},
                            "Class index 12 is out of range: this model has 10 classes, 0 to 9."),
    "labels_name_no_class": ({"sample__labels": ","}, "sample.labels=',' names no class."),
}


@pytest.mark.parametrize("name", list(CONFIG_ROWS))
def test_config_value(name):
  overrides, message = CONFIG_ROWS[name]
  with pytest.raises(ValueError, match=re.escape("Bad config: ")) as err:
    config_lib.validate(_base(**overrides))
  assert message in str(err.value)


@pytest.mark.parametrize("name", list(CLASS_CONFIG_ROWS))
def test_class_config_value(name):
  overrides, message = CLASS_CONFIG_ROWS[name]
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(_base("class", **overrides))


def test_attention_at_a_size_the_unet_lacks_warns():
  with pytest.warns(UserWarning, match=re.escape(
      "model.attn_resolutions=(3,) names feature-map size(s) [3] the U-Net does not have")):
    config_lib.validate(_base(model__attn_resolutions=(3,)))


MODEL_ROWS = {
    "ch_not_multiple_of_32": ({"model__ch": 16}, "GroupNorm(32) cannot split the 16 channels"),
    "patch_size_does_not_divide": ({"model__patch_size": 3},
                                   "image size 16x16 is not divisible by patch_size"),
    "unknown_model": ({"model__name": "dit"}, "unknown model.name 'dit'"),
}


@pytest.mark.parametrize("name", list(MODEL_ROWS))
def test_model_value(name):
  """Caught when the model is built and initialised, before any training step."""
  overrides, message = MODEL_ROWS[name]
  config = _base(**overrides)
  with pytest.raises(ValueError, match=re.escape(message)):
    model = models.create_model(config.model, config.data.channels)
    jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))


# ---------------------------------------------------------------------------
# Sample and eval modes on a trained workdir.


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory):
  """Two train steps of a one-level configs/test.py: one checkpoint, at step 2."""
  workdir = str(tmp_path_factory.mktemp("bad_input_run"))
  config = _base(model__ch_mult=(1,), model__attn_resolutions=(),
                 training__num_train_steps=2, training__sample_every_steps=0)
  config.data.data_dir = digits_dir
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A stand-in Inception weights file (only hashed by the early checks) and
  reference statistics files that do not fit it."""
  d = tmp_path_factory.mktemp("bad_input_files")
  weights = str(d / "inception_fid.npz")
  with open(weights, "wb") as f:
    f.write(b"stand-in weights: eval mode's early checks only hash this file")
  sha = inception.file_sha256(weights)
  small = stats.feature_statistics(np.random.default_rng(0).normal(size=(20, 4)))
  net = {"name": inception.NETWORK_NAME, "weights_sha256": sha}
  out = {"weights": weights, "dir": str(d)}
  out["ref_512d"] = str(d / "pytorch_fid_512d.npz")
  np.savez(out["ref_512d"], mu=np.zeros(512), sigma=np.eye(512))
  out["ref_other_weights"] = str(d / "other_weights.npz")
  stats.save_stats(out["ref_other_weights"], small,
                   {"feature_network": {**net, "weights_sha256": "ab" * 32}})
  out["ref_other_network"] = str(d / "other_network.npz")
  stats.save_stats(out["ref_other_network"], small,
                   {"feature_network": {"name": "digits classifier, 64-d"}})
  out["ref_few_features"] = str(d / "few_features.npz")
  pool3 = stats.FeatureStats(np.zeros(2048), np.eye(2048, dtype=np.float32), 100)
  stats.save_stats(out["ref_few_features"], pool3, {"feature_network": net},
                   features=np.zeros((3, 2048)))
  out["samples_file"] = npz_io.write_samples(str(d / "samples.npz"),
                                             np.zeros((4, 16, 16, 1), np.uint8))
  out["garbage"] = str(d / "garbage.npz")
  with open(out["garbage"], "w") as f:
    f.write("mu,sigma\n1,2\n")
  out["missing"] = str(d / "missing.npz")
  return out


def _config(workdir, **overrides):
  """The workdir's config (as --config=configs/from_workdir.py:DIR) with small,
  valid sample/eval settings, then the overrides."""
  config = from_workdir.get_config(workdir)
  config.sample.update(dict(num_steps=2, num_samples=8, batch_size=4))
  config.eval.update(dict(num_samples=16, batch_size=4, metrics=("digits_fd",),
                          bpd_batch_size=4, pr_num_real=100))
  return apply_overrides(config, **overrides)


SAMPLE_ROWS = {
    "num_samples_zero": ({"sample__num_samples": 0}, ValueError,
                         "Bad config: sample.num_samples and sample.batch_size must be > 0."),
    "unknown_method": ({"sample__method": "euler"}, ValueError,
                       "Bad config: sample.method='euler'"),
    "guidance_on_unconditional_checkpoint": (
        {"sample__guidance_scale": 3.0}, ValueError,
        "sample.guidance_scale=3.0 needs a class- or text-conditional model trained with "
        "conditioning dropout (conditioning.p_uncond > 0); use 1.0 otherwise."),
    "labels_on_unconditional_checkpoint": (
        {"sample__labels": "7"}, ValueError,
        "sample.labels='7' needs conditioning.type='class'; an unconditional model cannot "
        "generate chosen classes."),
    "missing_checkpoint_step": ({"sample__checkpoint_step": 5}, checkpointing.CheckpointError,
                                "No checkpoint step 5 in "),
    "batch_not_divisible": ({"sample__batch_size": 6}, ValueError,
                            "The global sample batch size 6 must be a positive multiple of the "
                            "number of devices (4"),
}


@pytest.mark.parametrize("name", list(SAMPLE_ROWS))
def test_sample_mode(run, name):
  overrides, error, message = SAMPLE_ROWS[name]
  with pytest.raises(error, match=re.escape(message)) as err:
    sample.sample_and_save(_config(run, **overrides), run)
  if name == "missing_checkpoint_step":
    assert "available: [2]" in str(err.value)


def test_sample_mode_without_checkpoints(run, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoint in .*train first"):
    sample.sample_and_save(_config(run), str(tmp_path))


def test_sample_mode_on_a_super_resolution_stage(tmp_path):
  with pytest.raises(ValueError, match=re.escape("A super-resolution stage needs low_res, "
                                                 "float [64, 16, 16, 3] in [-1, 1] (the "
                                                 "previous stage's samples): sample it in a "
                                                 "cascade")):
    sample.sample_and_save(shapes_sr32.get_config(), str(tmp_path))


def _weights(files, **overrides):
  return {"eval__inception_weights": files["weights"], **overrides}


EVAL_ROWS = {
    "labels_on_unconditional_checkpoint": (
        lambda f: {"sample__labels": "7"}, ValueError,
        "sample.labels='7' needs conditioning.type='class'; an unconditional model cannot "
        "generate chosen classes."),
    "guidance_on_unconditional_checkpoint": (
        lambda f: {"sample__guidance_scale": 2.0}, ValueError,
        "sample.guidance_scale=2.0 needs a class- or text-conditional model"),
    "missing_checkpoint_step": (lambda f: {"sample__checkpoint_step": 5},
                                checkpointing.CheckpointError, "No checkpoint step 5 in "),
    "no_metrics": (lambda f: {"eval__metrics": ()}, ValueError,
                   "config.eval.metrics is empty: nothing to compute"),
    "unknown_metric": (lambda f: {"eval__metrics": ("fid", "kid")}, ValueError,
                       "Unknown eval metric(s) ['kid']; valid: digits_fd, caption_accuracy, "
                       "psnr_ssim, fid, is, pr, bpd."),
    "one_sample": (lambda f: {"eval__num_samples": 1}, ValueError,
                   "config.eval.num_samples must be >= 2"),
    "batch_not_divisible": (lambda f: {"eval__batch_size": 6}, ValueError,
                            "The global eval.batch_size 6 must be a positive multiple of the "
                            "number of devices (4"),
    "bpd_batch_not_divisible": (lambda f: {"eval__metrics": ("bpd",), "eval__bpd_batch_size": 6},
                                ValueError, "The global eval.bpd_batch_size 6 must be"),
    "unknown_eval_split": (lambda f: {"eval__metrics": ("bpd",),
                                      "data__eval_split": "validation"}, ValueError,
                           "config.data.eval_split='validation': Unknown split 'validation'"),
    "unknown_reference_split": (
        lambda f: _weights(f, eval__metrics=("fid",), eval__reference_split="validation"),
        ValueError, "config.eval.reference_split='validation': Unknown split 'validation'"),
    "fewer_samples_than_is_splits": (
        lambda f: _weights(f, eval__metrics=("is",), eval__num_samples=8), ValueError,
        "config.eval.num_samples=8 is fewer than the Inception Score's 10 splits"),
    "pr_k_not_below_num_samples": (
        lambda f: _weights(f, eval__metrics=("pr",), eval__pr_k=16), ValueError,
        "config.eval.pr_k=16: precision/recall needs 1 <= pr_k < config.eval.num_samples=16"),
    "pr_k_zero": (lambda f: _weights(f, eval__metrics=("pr",), eval__pr_k=0), ValueError,
                  "config.eval.pr_k=0: precision/recall needs 1 <= pr_k"),
    "pr_num_real_not_above_k": (
        lambda f: _weights(f, eval__metrics=("pr",), eval__pr_num_real=3), ValueError,
        "config.eval.pr_num_real=3 must exceed config.eval.pr_k=3"),
    "reference_of_other_dimension": (
        lambda f: _weights(f, eval__metrics=("fid",), eval__fid_reference=f["ref_512d"]),
        ValueError, "are 512-d, not the 2048-d Inception pool3 features."),
    "reference_of_other_weights": (
        lambda f: _weights(f, eval__metrics=("fid",),
                           eval__fid_reference=f["ref_other_weights"]),
        ValueError, "were computed with other Inception weights (sha256 abababababab..."),
    "reference_of_other_network": (
        lambda f: _weights(f, eval__metrics=("fid",),
                           eval__fid_reference=f["ref_other_network"]),
        ValueError, "are features of 'digits classifier, 64-d', not of 'pytorch-fid"),
    "reference_too_few_features_for_pr": (
        lambda f: _weights(f, eval__metrics=("pr",), eval__fid_reference=f["ref_few_features"]),
        ValueError, "keep 3 real features, too few for precision/recall with "
        "config.eval.pr_k=3"),
    "reference_is_a_samples_file": (
        lambda f: _weights(f, eval__metrics=("fid",), eval__fid_reference=f["samples_file"]),
        ValueError, "is not a statistics file: it lacks ['mu', 'sigma'] (has ['arr_0'])."),
    "reference_not_an_npz": (
        lambda f: _weights(f, eval__metrics=("fid",), eval__fid_reference=f["garbage"]),
        ValueError, "is not a readable .npz"),
    "reference_missing": (lambda f: {"eval__fid_reference": f["missing"]}, FileNotFoundError,
                          "does not exist; set it to '' to compute reference statistics"),
    "inception_weights_missing": (lambda f: {"eval__inception_weights": f["missing"]},
                                  FileNotFoundError, "does not exist; see "
                                  "diffusion_jax/evaluation/inception.py for where to get it"),
}


@pytest.mark.parametrize("name", list(EVAL_ROWS))
def test_eval_mode(run, files, name):
  overrides, error, message = EVAL_ROWS[name]
  with pytest.raises(error, match=re.escape(message)):
    evaluate.evaluate(_config(run, **overrides(files)), run)


def test_eval_mode_without_checkpoints(run, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoints in .*train first"):
    evaluate.evaluate(_config(run), str(tmp_path))


# ---------------------------------------------------------------------------
# Library calls: the sampler, generate(), labels, captions (no parameters
# needed: every check runs on the host before the jitted sampler).


def _sampler(config, batch_size=4, guided=None):
  model = models.create_model(config.model, config.data.channels)
  return generation.make_sample_fn(model, builders.make_schedule(config), config, batch_size,
                                   parallel.make_mesh(), guided=guided)


def _call(kind, cond=None, guidance_scale=None):
  return lambda: _sampler(_base(kind))(None, jax.random.key(0), cond, guidance_scale)


def _generate(kind, num_samples=8, batch_size=4, built=4, guided=None, **kwargs):
  return lambda: generation.generate(_sampler(_base(kind), built, guided), None, num_samples,
                                     batch_size, seed=0, **kwargs)


def _sr_call(low_res_shape):
  config = shapes_sr32.get_config()
  return lambda: _sampler(config)(None, jax.random.key(0),
                                  {"low_res": np.zeros(low_res_shape, np.float32)})


def _request(kind, **given):
  return lambda: Conditioning(_base(kind)).request(4, **given)


def _captions(spec):
  config = shapes_text_glide.get_config()
  config.sample.captions = spec
  return lambda: Conditioning(config).request(4)


CALL_ROWS = {
    "generate_zero_samples": (_generate("uncond", num_samples=0), ValueError,
                              "num_samples and batch_size must be > 0, got 0 and 4."),
    "generate_batch_differs_from_sampler": (
        _generate("uncond", batch_size=8), ValueError,
        "batch_size=8, but the sampler was built for batches of 4"),
    "labels_wrong_length": (_generate("class", cond={"label": np.arange(5)}), ValueError,
                            "cond['label'] has 5 entries for 8 samples."),
    "guidance_scales_wrong_length": (
        _generate("class", guided=True, cond={"label": np.arange(8)},
                  guidance_scale=np.ones(5)),
        ValueError, "guidance_scale has 5 entries for 8 samples."),
    "labels_float": (_call("class", {"label": np.full(4, 1.5)}), ValueError,
                     "labels must be integer class indices, got dtype float64"),
    "labels_strings": (_call("class", {"label": np.array(["cat"] * 4)}), ValueError,
                       "labels must be integer class indices, got dtype <U3"),
    "labels_out_of_range": (_call("class", {"label": np.array([0, 1, 2, 11])}), ValueError,
                            "Label 11 is out of range: this model has 10 classes, 0 to 9 "
                            "(10 is the null class)."),
    "labels_2d": (_call("class", {"label": np.zeros((4, 1), np.int32)}), ValueError,
                  "labels must have shape [4], got (4, 1)."),
    "class_model_without_labels": (_call("class"), ValueError,
                                   "The model is conditioned on class labels: cond lacks "
                                   "['label']; build it with Conditioning(config).request"),
    "labels_to_unconditional_sampler": (_call("uncond", {"label": np.zeros(4, np.int32)}),
                                        ValueError, "cond holds ['label'], but the model is "
                                        "conditioned on nothing (unconditional)."),
    "labels_to_unconditional_request": (_request("uncond", labels=np.zeros(4, np.int32)),
                                        ValueError, "labels was given, but the model is "
                                        "conditioned on nothing (unconditional)."),
    "guidance_to_unguided_sampler": (_call("class", {"label": np.zeros(4, np.int32)}, 2.0),
                                     ValueError,
                                     "This sampler was built without guidance (guided=False)"),
    "guidance_to_unconditional_sampler": (_call("uncond", None, 2.0), ValueError,
                                          "sample.guidance_scale=2.0 needs a class- or "
                                          "text-conditional model"),
    "low_res_to_base_model": (_call("uncond", {"low_res": np.zeros((4, 8, 8, 1))}),
                              ValueError, "cond holds ['low_res'], but the model is "
                              "conditioned on nothing"),
    "low_res_wrong_shape": (_sr_call((4, 8, 8, 3)), ValueError,
                            "low_res must have shape (4, 16, 16, 3) (data.low_res_size=16), "
                            "got (4, 8, 8, 3)."),
    "low_res_missing_in_request": (lambda: Conditioning(shapes_sr32.get_config()).request(4),
                                   ValueError, "A super-resolution stage needs low_res, float "
                                   "[4, 16, 16, 3]"),
    "text_to_unconditional_sampler": (_call("uncond", {"tokens": np.zeros((4, 2))}),
                                      ValueError, "cond holds ['tokens'], but the model is "
                                      "conditioned on nothing"),
    "captions_to_class_request": (_request("class", captions=["a red circle"] * 4), ValueError,
                                  "captions was given, but the model is conditioned on class "
                                  "labels."),
    "parse_labels_floats": (lambda: guidance.parse_labels([1.5, 2.0], 10, 4), ValueError,
                            "Labels must be integer class indices, got [1.5, 2.0]"),
    "caption_file_missing": (_captions("@no_such_captions.txt"), FileNotFoundError,
                             "sample.captions='@no_such_captions.txt': no caption file"),
    "captions_empty": (_captions(" ; ;"), ValueError,
                       "A text-conditioned model samples from captions: set sample.captions"),
}


@pytest.mark.parametrize("name", list(CALL_ROWS))
def test_library_call(name):
  fn, error, message = CALL_ROWS[name]
  with pytest.raises(error, match=re.escape(message)):
    fn()


# ---------------------------------------------------------------------------
# Evaluation library inputs.


def _write(path, content):
  """Writes an .npy (an array) or a text file (a str); returns the path."""
  if isinstance(content, np.ndarray):
    np.save(path, content)
  else:
    with open(path, "w") as f:
      f.write(content)
  return path


def _stats_npz(path, mu, sigma):
  np.savez(path, mu=mu, sigma=sigma)
  return path


EVALUATION_ROWS = {
    "is_fewer_samples_than_splits": (
        lambda d: stats.inception_score(np.zeros((5, 1008)), 10),
        "logits must be [N >= splits=10, C], got (5, 1008): the Inception Score needs at "
        "least one sample per split."),
    "pr_k_not_below_real_count": (
        lambda d: precision_recall.precision_recall(np.zeros((3, 8)), np.zeros((10, 8)), k=3),
        "Precision/recall with k=3 needs more than 3 real features"),
    "pr_k_zero": (lambda d: precision_recall.knn_radii(np.zeros((10, 8)), k=0),
                  "k must be >= 1 (the neighbourhood size), got 0."),
    "frechet_of_other_dimensions": (
        lambda d: stats.frechet_distance(np.zeros(4), np.eye(4), np.zeros(8), np.eye(8)),
        "Were both computed with the same feature network?"),
    "samples_float": (lambda d: npz_io.write_samples(os.path.join(d, "s"),
                                                     np.zeros((2, 8, 8, 3), np.float32)),
                      "images must be uint8 in 0..255, got float32"),
    "samples_nchw": (lambda d: npz_io.write_samples(os.path.join(d, "s"),
                                                    np.zeros((2, 3, 8, 8), np.uint8)),
                     "(it looks like NCHW: transpose to NHWC)"),
    "sample_labels_wrong_length": (
        lambda d: npz_io.write_samples(os.path.join(d, "s"), np.zeros((2, 8, 8, 3), np.uint8),
                                       labels=np.zeros(3)),
        "labels must be [2], got (3,)."),
    "samples_file_not_npz": (
        lambda d: npz_io.read_samples(_write(os.path.join(d, "s.npz"), "not a zip")),
        "is not a readable .npz"),
    "samples_file_is_npy": (
        lambda d: npz_io.read_samples(_write(os.path.join(d, "s.npy"), np.zeros(3))),
        "holds one bare array (.npy), not an .npz"),
    "stats_file_is_npy": (
        lambda d: stats.load_stats(_write(os.path.join(d, "r.npy"), np.zeros(3))),
        "holds one bare array (.npy), not an .npz; it should be reference statistics"),
    "stats_shapes_disagree": (
        lambda d: stats.load_stats(_stats_npz(os.path.join(d, "r.npz"), np.zeros(4),
                                              np.eye(3))),
        "mu (4,) and sigma (3, 3) do not fit."),
}


@pytest.mark.parametrize("name", list(EVALUATION_ROWS))
def test_evaluation_input(name, tmp_path):
  fn, message = EVALUATION_ROWS[name]
  with pytest.raises(ValueError, match=re.escape(message)):
    fn(str(tmp_path))


# ---------------------------------------------------------------------------
# Cascades (configs/cascade.py) before any stage is restored.


def _cascade(num_stages=2, **cascade_overrides):
  config = cascade_config.get_config("")
  base = _base(data__image_size=16)
  sr = apply_overrides(test_config.get_config(), data__image_size=32, data__low_res_size=16,
                       model__low_res_channels=1)
  for i, stage in enumerate([base, sr][:num_stages]):
    config[f"stage_{i}"] = stage
  config.cascade.workdirs = tuple(f"dir{i}" for i in range(num_stages))
  config.cascade.update(cascade_overrides)
  return config


CASCADE_ROWS = {
    "zero_samples": (lambda: cascade.sample_cascade(_cascade(num_samples=0), "out"),
                     "cascade.num_samples and cascade.batch_size must be > 0, got 0 and 64."),
    "one_stage": (lambda: cascade.check_chain(cascade.stages(_cascade(1))),
                  "A cascade needs a base and at least one super-resolution stage; got 1"),
    "stages_do_not_chain": (
        lambda: cascade.check_chain([_base(), _base(data__image_size=32, data__low_res_size=8,
                                                    model__low_res_channels=1)]),
        "The stages do not chain: stage_0 makes 16x16x1 images, but stage_1 upsamples 8x8x1"),
    "labels_without_class_stage": (
        lambda: cascade.sample_cascade(_cascade(labels="3"), "out"),
        "sample.labels='3' needs conditioning.type='class'; an unconditional model cannot "
        "generate chosen classes."),
    "class_upsampler_without_class_base": (
        lambda: cascade.check_chain([_base(), apply_overrides(
            _base("class"), data__image_size=32, data__low_res_size=16,
            model__low_res_channels=1)]),
        "stage_1 is conditioned on class labels and a low-resolution image, but the base "
        "(stage_0) takes no labels, so they would not match the base samples."),
}


@pytest.mark.parametrize("name", list(CASCADE_ROWS))
def test_cascade(name):
  fn, message = CASCADE_ROWS[name]
  with pytest.raises(ValueError, match=re.escape(message)):
    fn()


# ---------------------------------------------------------------------------
# The command line (python -m diffusion_jax.main), three processes at once.

CLI_ROWS = {
    "misspelt_override": (["--config=configs/test.py", "--config.optim.lrr=1e-4"],
                          'Bad command line: a --config override could not be applied (lrr '
                          'Did you mean "lr" instead of "lrr"?)'),
    "train_without_config": ([], "--config is required for --mode=train, e.g. "
                                 "--config=configs/digits.py"),
    "unknown_mode": (["--mode=serve"],
                     "flag --mode=serve: value should be one of <train|sample|eval|distill>"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """{row: (returncode, stderr)} of each CLI row's run of main."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = {}
  for name, (args, _) in CLI_ROWS.items():
    workdir = tmp_path_factory.mktemp(f"cli_{name}")
    stderr = open(workdir / "stderr.txt", "w+")  # a file: a pipe could fill and block
    procs[name] = (stderr, subprocess.Popen(
        [sys.executable, "-m", "diffusion_jax.main", f"--workdir={workdir}", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
  out = {}
  for name, (stderr, proc) in procs.items():
    returncode = proc.wait(timeout=300)
    stderr.seek(0)
    out[name] = (returncode, stderr.read())
    stderr.close()
  return out


@pytest.mark.parametrize("name", list(CLI_ROWS))
def test_cli(cli, name):
  returncode, stderr = cli[name]
  assert returncode != 0
  assert CLI_ROWS[name][1] in stderr, stderr[-2000:]
