"""Eval mode: a checkpoint's sample quality and likelihood, with a JSON report.

  python -m diffusion_jax.main --mode=eval --workdir=DIR \
      [--config=configs/from_workdir.py:DIR --config.eval.num_samples=10000 ...]

Restores only the EMA parameters (of `config.sample.checkpoint_step`, default
the latest), draws `config.eval.num_samples` images with the sampler of
`config.sample` and the seed `config.eval.seed`, and computes the metrics named
in `config.eval.metrics`; each is computed where it applies to the model and
data, and otherwise listed under "skipped" with the reason:

  digits_fd         offline quality on the digits (evaluation/digits_quality.py);
                    class models also get class accuracy and per-class figures
  caption_accuracy  text models on `shapes`: the shapes checker reads each
                    caption back (evaluation/conditional_metrics.py)
  psnr_ssim         super-resolution stages: against the real high-res images
  fid               Frechet Inception distance to reference statistics
  is                Inception Score (10 splits)
  pr                precision and recall (k = config.eval.pr_k) in Inception space
  bpd               bits per dim (DDPM variational bound) on the eval split, each
                    example conditioned on its own label, caption or low-res image

A conditional model is sampled on the conditioning of the first
`eval.num_samples` eval-split examples (cycled): their labels, captions and
low-resolution images, except what `sample.labels` or `sample.captions` name.
FID/IS/PR need the FID Inception weights (config.eval.inception_weights, see
evaluation/inception.py); without them they are skipped, never estimated some
other way. Everything lands in <workdir>/eval/: report_<name>.json (every
setting that affects the numbers), <name>.npz (the samples, arr_0 uint8 NHWC,
with `labels` or `captions`) and the cached reference statistics.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import (builders, cascade, checkpointing, generation, input_pipeline,
                           parallel, run_logging, sample)
from diffusion_jax.conditioning import Conditioning, Request
from diffusion_jax.evaluation import bpd, conditional_metrics, inception_metrics, npz_io

METRICS = ("digits_fd", "caption_accuracy", "psnr_ssim", "fid", "is", "pr", "bpd")


def _check(config: ml_collections.ConfigDict, workdir: str) -> None:
  _check_settings(config, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise checkpointing.CheckpointError(
        f"No checkpoints in {workdir!r} (no {ckpt_dir}): train first, or pass the "
        "--workdir of a training run.")
  mesh = parallel.make_mesh()
  if "bpd" in config.eval.metrics or Conditioning(config).inputs:  # both read the eval split
    input_pipeline.check_split(config.data, config.data.eval_split, "config.data.eval_split")
  if "bpd" in config.eval.metrics:
    parallel.check_batch_size(config.eval.bpd_batch_size, mesh, "eval.bpd_batch_size")


def _check_settings(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The eval section: metrics, counts, files (checked before any work)."""
  ev = config.eval
  unknown = [m for m in ev.metrics if m not in METRICS]
  if unknown:
    raise ValueError(f"Unknown eval metric(s) {unknown}; valid: {', '.join(METRICS)}.")
  if not ev.metrics:
    raise ValueError(f"config.eval.metrics is empty: nothing to compute; name some of "
                     f"{', '.join(METRICS)}.")
  if ev.num_samples < 2 or ev.batch_size < 1:
    raise ValueError("config.eval.num_samples must be >= 2 and eval.batch_size >= 1.")
  if ev.bpd_max_examples < 0 or ev.reference_max_examples < 0 or ev.pr_num_real < 0:
    raise ValueError("config.eval.bpd_max_examples, reference_max_examples and pr_num_real "
                     "must be >= 0 (0: no cap / keep none).")
  if ev.inception_weights and not os.path.exists(ev.inception_weights):
    raise FileNotFoundError(f"config.eval.inception_weights={ev.inception_weights!r} does "
                            "not exist; see diffusion_jax/evaluation/inception.py for where "
                            "to get it, or set it to '' to skip FID/IS/PR.")
  if ev.fid_reference and not os.path.exists(ev.fid_reference):
    raise FileNotFoundError(f"config.eval.fid_reference={ev.fid_reference!r} does not "
                            "exist; set it to '' to compute reference statistics from "
                            f"split {ev.reference_split!r} (cached in {workdir}/eval/).")
  parallel.check_batch_size(ev.batch_size, parallel.make_mesh(), "eval.batch_size")
  inception_metrics.check_request(config, workdir)


def report_name(config: ml_collections.ConfigDict, step: int) -> str:
  s, ev = config.sample, config.eval
  steps = s.num_steps or config.diffusion.num_timesteps
  name = f"{s.method}{steps}_step{step}_seed{ev.seed}_n{ev.num_samples}"
  name += generation.convention_suffix(s)
  if s.guidance_scale != 1.0:
    name += f"_cfg{s.guidance_scale:g}"
  return name


def _sampler_settings(config: ml_collections.ConfigDict,
                      conditioning: Conditioning) -> dict[str, Any]:
  s = config.sample
  out = dict(method=s.method, num_steps=s.num_steps or config.diffusion.num_timesteps,
             eta=s.eta, variance=s.variance, prediction=config.diffusion.prediction,
             schedule=config.diffusion.schedule,
             num_timesteps=config.diffusion.num_timesteps, batch_size=config.eval.batch_size,
             thresholding=s.thresholding,
             dynamic_threshold_percentile=s.dynamic_threshold_percentile,
             timestep_spacing=s.timestep_spacing, ddim_eps=s.ddim_eps,
             guidance_scale=s.guidance_scale, labels=s.labels, captions=s.captions)
  if conditioning.upsamples:
    out["sample_aug_level"] = config.superres.sample_aug_level
  return out


def _digits_metrics(config: ml_collections.ConfigDict, images: np.ndarray,
                    labels: Optional[np.ndarray], report: dict[str, Any]) -> None:
  """digits_quality of the samples, or a skip reason for data that are not digits."""
  if config.data.name != "digits" or images.shape[1:] != (16, 16, 1):
    report["skipped"]["digits_fd"] = (
        f"needs the 16x16x1 'digits' data set (data.name={config.data.name!r}, images "
        f"{images.shape[1:]})")
    logging.warning("Skipping digits_fd: %s.", report["skipped"]["digits_fd"])
    return
  # pylint: disable-next=g-import-not-at-top  (only digits runs need it)
  from diffusion_jax.evaluation import digits_classifier, digits_quality
  clf = digits_classifier.DigitsClassifier.load_or_train(
      config.data.data_dir, config.eval.digits_classifier_cache or None)
  report["metrics"]["digits_fd"] = digits_quality.digits_quality(
      images, clf, config.data.data_dir, labels=labels)


def _eval_inputs(config: ml_collections.ConfigDict, conditioning: Conditioning, n: int
                 ) -> tuple[dict[str, Any], Optional[np.ndarray]]:
  """(request inputs, uint8 real images) of the first n eval-split examples, cycled.

  Every process reads the same examples, so every host asks for the same
  samples. Inputs that the config names (`sample.labels`, `sample.captions`)
  are left to the request; an unconditional model reads nothing.
  """
  if not conditioning.inputs:
    return {}, None
  parts, got = [], 0
  for batch in input_pipeline.create_eval_iterator(config.data, config.eval.batch_size,
                                                   process_index=0, process_count=1):
    keep = np.asarray(batch["mask"])
    parts.append({k: np.asarray(v)[keep] for k, v in batch.items()})
    got += int(keep.sum())
    if got >= n:
      break
  idx = np.arange(n) % got
  examples = {k: np.concatenate([p[k] for p in parts])[idx] for k in parts[0]}
  inputs = conditioning.batch_inputs(examples)
  named = [k for k in inputs if k in config.sample and str(config.sample[k]).strip()]
  return ({k: v for k, v in inputs.items() if k not in named},
          run_logging.to_uint8(examples["image"]))


def _generate(model, params, config: ml_collections.ConfigDict, mesh,
              conditioning: Conditioning
              ) -> tuple[np.ndarray, Request, Optional[np.ndarray]]:
  """(uint8 [N, H, W, C] samples, their Request, the real examples' images)."""
  ev = config.eval
  given, real = _eval_inputs(config, conditioning, ev.num_samples)
  request = conditioning.request(ev.num_samples, **given)
  sample_fn = generation.make_sample_fn(model, builders.make_schedule(config), config,
                                        ev.batch_size, mesh, conditioning=conditioning)
  images = generation.generate(sample_fn, params, ev.num_samples, ev.batch_size, ev.seed,
                               config.sample.eta, cond=request.cond)
  return images, request, real


def _skip(report: dict[str, Any], metric: str, why: str) -> None:
  report["skipped"][metric] = why
  logging.warning("Skipping %s: %s.", metric, why)


def _conditional_metrics(config, conditioning: Conditioning, images: np.ndarray,
                         request: Request, real: Optional[np.ndarray], wanted: list[str],
                         report: dict[str, Any]) -> None:
  """caption_accuracy and psnr_ssim, computed or skipped with the reason."""
  if "caption_accuracy" in wanted:
    value, why = conditional_metrics.caption_accuracy(images, request.captions,
                                                      config.data.name)
    if why:
      _skip(report, "caption_accuracy", why)
    else:
      report["metrics"]["caption_accuracy"] = value
  if "psnr_ssim" in wanted:
    upsampled = conditioning.upsampled_input
    inputs = request.cond[upsampled] if upsampled else None
    value, why = conditional_metrics.superres_quality(images, real if upsampled else None,
                                                      inputs)
    if why:
      _skip(report, "psnr_ssim", why)
    else:
      report["metrics"]["psnr_ssim"] = value


def _sample_metrics(model, params, config: ml_collections.ConfigDict, mesh, workdir: str,
                    name: str, report: dict[str, Any], conditioning: Conditioning) -> None:
  """Draws the eval samples and fills report["metrics"] with the sample metrics."""
  start = time.perf_counter()
  images, request, real = _generate(model, params, config, mesh, conditioning)
  report["timing_seconds"]["sampling"] = round(time.perf_counter() - start, 1)
  _score(config, conditioning, images, request, real, workdir, name, report)


def _score(config: ml_collections.ConfigDict, conditioning: Conditioning, images: np.ndarray,
           request: Request, real: Optional[np.ndarray], workdir: str, name: str,
           report: dict[str, Any]) -> None:
  """Saves the samples (eval.save_samples) and fills in every sample metric asked for."""
  ev = config.eval
  wanted = [m for m in ev.metrics if m != "bpd" and m not in report["skipped"]]
  if ev.save_samples and jax.process_index() == 0:
    report["samples_file"] = npz_io.write_samples(
        os.path.join(workdir, "eval", name + ".npz"), images, request.labels,
        request.captions)
  start = time.perf_counter()
  if "digits_fd" in wanted:
    _digits_metrics(config, images, request.labels, report)
  _conditional_metrics(config, conditioning, images, request, real, wanted, report)
  inception_wanted = [m for m in wanted if m in inception_metrics.INCEPTION_METRICS]
  if inception_wanted:
    inception_metrics.inception_metrics(config, workdir, images, inception_wanted, report)
  report["timing_seconds"]["sample_metrics"] = round(time.perf_counter() - start, 1)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Eval mode; returns the report (also written to <workdir>/eval/report_<name>.json)."""
  if config.model.name in ("clip", "prior"):
    # pylint: disable-next=g-import-not-at-top  (unclip imports this module)
    from diffusion_jax.unclip import evaluation as unclip_eval
    if config.model.name == "prior":
      raise ValueError(f"{workdir} holds an unCLIP prior: evaluate it in its pipeline, "
                       "--mode=eval --config=configs/unclip.py:PRIOR_DIR,DECODER_DIR.")
    return unclip_eval.clip_report(config, workdir)
  _check(config, workdir)
  conditioning = Conditioning(config)
  sample.check_request(config, workdir, conditioning)
  model, params, step, mesh = builders.restore_ema(config, workdir, config.sample.checkpoint_step)
  logging.info("Eval: restored EMA parameters of step %d from %s", step, workdir)
  ev, name = config.eval, report_name(config, step)
  report = {**_report_header(config, workdir, conditioning), "checkpoint_step": int(step),
            "params": "ema", "sampler": _sampler_settings(config, conditioning)}
  if any(m != "bpd" for m in ev.metrics):
    _sample_metrics(model, params, config, mesh, workdir, name, report, conditioning)
  if "bpd" in ev.metrics and conditioning.takes_guidance_scale:
    _skip(report, "bpd", "a guidance-distilled student learnt the guided output at a scale, "
          "which is no density: it has no likelihood (evaluate bits/dim on its teacher)")
  elif "bpd" in ev.metrics:
    start = time.perf_counter()
    report["metrics"]["bpd"] = bpd.bits_per_dim_on_split(model, params, config, mesh,
                                                         conditioning)
    report["timing_seconds"]["bpd"] = round(time.perf_counter() - start, 1)
  write_report(report, workdir, name)
  return report


def _report_header(config: ml_collections.ConfigDict, workdir: str,
                   conditioning: Conditioning) -> dict[str, Any]:
  ev = config.eval
  return {"workdir": os.path.abspath(workdir), "num_samples": ev.num_samples, "seed": ev.seed,
          "conditioned_on": conditioning.describe(),
          "data": {k: config.data[k] for k in ("name", "data_dir", "image_size", "channels",
                                               "train_split", "eval_split")},
          "metrics_requested": list(ev.metrics), "metrics": {}, "skipped": {},
          "warnings": [], "feature_network": None, "reference": None,
          "timing_seconds": {}, "jax_version": jax.__version__,
          "device_count": jax.device_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def evaluate_cascade(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Eval mode of a cascade config: the final stage's samples, one report.

  The base is asked for the labels or captions of its eval split's first
  `cascade.num_samples` examples (unless cascade.labels / cascade.captions name
  them); the final images are scored with the last stage's `eval` section and
  data (digits_fd, caption_accuracy, fid, is, pr). bpd and psnr_ssim belong to
  single stages: eval mode on a stage's own workdir gives them.
  """
  stage_configs = cascade.stages(config)
  c, base, final = config.cascade, stage_configs[0], stage_configs[-1]
  final.eval.num_samples, final.eval.seed = c.num_samples, c.seed
  _check_settings(final, workdir)
  base_conditioning, name = Conditioning(base), f"{c.name}_n{c.num_samples}_seed{c.seed}"
  given, _ = _eval_inputs(base, base_conditioning, c.num_samples)
  start = time.perf_counter()
  outputs, request = cascade.run_cascade(config, given)
  report = {**_report_header(final, workdir, base_conditioning),
            "cascade": {"workdirs": list(c.workdirs), "batch_size": c.batch_size,
                        "samplers": [_sampler_settings(s, Conditioning(s))
                                     for s in stage_configs]},
            "timing_seconds": {"sampling": round(time.perf_counter() - start, 1)}}
  for metric in ("bpd", "psnr_ssim"):
    if metric in final.eval.metrics:
      report["skipped"][metric] = ("a single stage's metric: run eval mode on that stage's "
                                   "workdir")
  _score(final, base_conditioning, outputs[-1], request, None, workdir, name, report)
  write_report(report, workdir, name)
  return report


def write_report(report: dict[str, Any], workdir: str, name: str) -> None:
  """<workdir>/eval/report_<name>.json, atomically (process 0); logs the metrics."""
  for warning in report["warnings"]:
    logging.warning("%s", warning)
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "eval", f"report_{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  report["report_file"] = path
  logging.info("Eval report written to %s:\n%s", path,
               json.dumps(report["metrics"], indent=2, sort_keys=True))
