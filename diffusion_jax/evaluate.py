"""Eval mode: a checkpoint's sample quality and likelihood, with a JSON report.

  python -m diffusion_jax.main --mode=eval --workdir=DIR \
      [--config=configs/from_workdir.py:DIR --config.eval.num_samples=10000 ...]

Restores only the EMA parameters (of `config.sample.checkpoint_step`, default
the latest), draws `config.eval.num_samples` images with the sampler of
`config.sample` and the seed `config.eval.seed`, and computes the metrics named
in `config.eval.metrics`:

  digits_fd  offline quality on the digits (evaluation/digits_quality.py)
  fid        Frechet Inception distance to reference statistics
  is         Inception Score (10 splits)
  pr         precision and recall (k = config.eval.pr_k) in Inception space
  bpd        bits per dim (DDPM variational bound) on the eval split

FID/IS/PR need the FID Inception weights (config.eval.inception_weights, see
evaluation/inception.py); without them they are skipped with a log line and
listed under "skipped" in the report, never estimated some other way.
Everything lands in <workdir>/eval/: report_<name>.json (every setting that
affects the numbers), <name>.npz (the samples, arr_0 uint8 NHWC) and the cached
reference statistics.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import (builders, checkpointing, conditioning, config_lib,
                           default_config, input_pipeline, likelihood, parallel, sample)
from diffusion_jax.evaluation import npz_io, stats

METRICS = ("digits_fd", "fid", "is", "pr", "bpd")
INCEPTION_METRICS = ("fid", "is", "pr")
IS_SPLITS = 10


def with_eval_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the default `eval` section to a config saved before it existed."""
  if "eval" in config:
    return config
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.eval = default_config.get_config().eval
  logging.info("The config has no eval section; using default_config.py's.")
  return config


def _check(config: ml_collections.ConfigDict, workdir: str) -> None:
  ev = config.eval
  if conditioning.is_superres(config) or conditioning.is_text(config):
    raise ValueError(
        "Eval mode scores unconditional and class-conditional models. A super-resolution "
        "stage is scored by benchmarks/superres_bench.py (PSNR/SSIM) or in a cascade, and a "
        "text-conditioned model by benchmarks/caption_bench.py (caption accuracy).")
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
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise checkpointing.CheckpointError(
        f"No checkpoints in {workdir!r} (no {ckpt_dir}): train first, or pass the "
        "--workdir of a training run.")
  mesh = parallel.make_mesh()
  parallel.check_batch_size(ev.batch_size, mesh, "eval.batch_size")
  if "bpd" in ev.metrics and not config.model.num_classes:
    parallel.check_batch_size(ev.bpd_batch_size, mesh, "eval.bpd_batch_size")
    _check_split(config.data, config.data.eval_split, "config.data.eval_split")
  _check_inception_request(config, workdir)


def _check_split(data_config: ml_collections.ConfigDict, split: str, field: str) -> None:
  """Raises ValueError naming the config field when the data set lacks `split`."""
  try:
    input_pipeline.split_info(data_config, split)
  except ValueError as e:
    if "split" not in str(e).lower():
      raise
    raise ValueError(f"{field}={split!r}: {e}") from e


def _check_inception_request(config: ml_collections.ConfigDict, workdir: str) -> None:
  """FID/IS/PR settings that would fail only after sampling: checked before it."""
  ev = config.eval
  wanted = [m for m in ev.metrics if m in INCEPTION_METRICS]
  if not wanted or not ev.inception_weights:
    return  # skipped (and reported so) without weights
  if "is" in wanted and ev.num_samples < IS_SPLITS:
    raise ValueError(f"config.eval.num_samples={ev.num_samples} is fewer than the Inception "
                     f"Score's {IS_SPLITS} splits; draw more samples (IS is usually reported "
                     "on 50,000) or drop 'is' from config.eval.metrics.")
  if "pr" in wanted and not 1 <= ev.pr_k < ev.num_samples:
    raise ValueError(f"config.eval.pr_k={ev.pr_k}: precision/recall needs 1 <= pr_k < "
                     f"config.eval.num_samples={ev.num_samples} (each sample's k-th nearest "
                     "neighbour among the others).")
  if "fid" not in wanted and "pr" not in wanted:
    return
  path, computed = _reference_path(config, workdir)
  if computed:
    if "pr" in wanted and ev.pr_num_real <= ev.pr_k:
      raise ValueError(f"config.eval.pr_num_real={ev.pr_num_real} must exceed "
                       f"config.eval.pr_k={ev.pr_k}: it is how many real features the "
                       "reference keeps for precision/recall.")
    if ev.reference_max_examples == 1:
      raise ValueError("config.eval.reference_max_examples=1: a covariance needs >= 2 "
                       "images (0 reads the whole split).")
    _check_split(config.data, ev.reference_split, "config.eval.reference_split")
    return
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.evaluation import inception
  ref, meta, feats = stats.load_stats(path)
  _check_reference_matches(path, ref, meta, inception.file_sha256(ev.inception_weights),
                           cached=not ev.fid_reference)
  if "pr" in wanted and feats is not None and len(feats) <= ev.pr_k:
    raise ValueError(f"Reference statistics {path!r} keep {len(feats)} real features, too "
                     f"few for precision/recall with config.eval.pr_k={ev.pr_k}; use a file "
                     "with more, or drop 'pr' from config.eval.metrics.")


def _reference_path(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, bool]:
  """(path of the reference statistics, whether eval mode must compute them)."""
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.evaluation import reference
  ev = config.eval
  if ev.fid_reference:
    return ev.fid_reference, False
  path = reference.default_path(workdir, config.data, ev.reference_split,
                                ev.reference_max_examples)
  return path, not os.path.exists(path)


def _check_reference_matches(path: str, ref: stats.FeatureStats, meta: dict[str, Any],
                             weights_sha256: str, cached: bool) -> None:
  """Raises ValueError unless the statistics are of this Inception's pool3 features."""
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.evaluation import inception
  fix = (" It is eval mode's cache: delete it to recompute it." if cached else
         " Set config.eval.fid_reference to statistics of the same network, or to '' to "
         "compute them.")
  net = meta.get("feature_network", {})
  if net.get("name", inception.NETWORK_NAME) != inception.NETWORK_NAME:
    raise ValueError(f"Reference statistics {path!r} are features of {net['name']!r}, not of "
                     f"{inception.NETWORK_NAME!r}." + fix)
  theirs = net.get("weights_sha256")
  if theirs and theirs != weights_sha256:
    raise ValueError(f"Reference statistics {path!r} were computed with other Inception "
                     f"weights (sha256 {theirs[:12]}..., these are {weights_sha256[:12]}...)."
                     + fix)
  if ref.mu.shape[0] != inception.POOL3_DIM:
    raise ValueError(f"Reference statistics {path!r} are {ref.mu.shape[0]}-d, not the "
                     f"{inception.POOL3_DIM}-d Inception pool3 features." + fix)


def _check_sample_request(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The sampler settings, and labels/guidance the checkpoint's model can honour."""
  config_lib.validate_sample(config)
  trained = None
  if os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE)):
    trained = checkpointing.load_config(workdir)
  sample.check_sample_request(config, trained)


def report_name(config: ml_collections.ConfigDict, step: int) -> str:
  s, ev = config.sample, config.eval
  steps = s.num_steps or config.diffusion.num_timesteps
  name = f"{s.method}{steps}_step{step}_seed{ev.seed}_n{ev.num_samples}"
  if s.get("guidance_scale", 1.0) != 1.0:
    name += f"_cfg{s.guidance_scale:g}"
  return name


def _sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  s = config.sample
  out = dict(method=s.method, num_steps=s.num_steps or config.diffusion.num_timesteps,
             eta=s.eta, variance=s.variance, prediction=config.diffusion.prediction,
             schedule=config.diffusion.schedule,
             num_timesteps=config.diffusion.num_timesteps, batch_size=config.eval.batch_size)
  # Whichever of these the config has (older configs: clip_denoised only).
  for key in ("clip_denoised", "thresholding", "dynamic_threshold_percentile",
              "guidance_scale", "labels"):
    if key in s:
      out[key] = s[key]
  return out


def _bpd_fn(model, config: ml_collections.ConfigDict, mesh) -> Callable:
  """jit fn(params, x0 [B, H, W, C] in [-1, 1], rng) -> bits/dim [B], batch sharded."""
  schedule = builders.make_schedule(config)
  data = parallel.data_sharded(mesh)

  def fn(params, x0, rng):
    def denoise_fn(x, t):
      x = jax.lax.with_sharding_constraint(x, data)
      return model.apply({"params": params}, x, t, None, train=False)
    return likelihood.bits_per_dim(denoise_fn, schedule, x0, rng,
                                   prediction=config.diffusion.prediction,
                                   variance=config.sample.variance, clip_denoised=False)
  return jax.jit(fn, out_shardings=data)


def bits_per_dim_on_split(model, params, config: ml_collections.ConfigDict, mesh
                          ) -> dict[str, Any]:
  """Mean bits/dim over the eval split (capped at eval.bpd_max_examples if > 0).

  Batch i uses key fold_in(key(eval.seed), i) for its one noise draw per
  timestep, so the figure is reproducible.

  Returns:
    {"bits_per_dim": mean, "std": std over examples, "num_examples": n,
     "split": ..., ...settings}.
  """
  ev = config.eval
  parallel.check_batch_size(ev.bpd_batch_size, mesh, "eval.bpd_batch_size")
  fn = _bpd_fn(model, config, mesh)
  values, start = [], time.perf_counter()
  it = input_pipeline.create_eval_iterator(config.data, ev.bpd_batch_size)
  for i, batch in enumerate(it):
    batch = parallel.to_global({"image": batch["image"], "mask": batch["mask"]}, mesh)
    bpd = fn(params, batch["image"], jax.random.fold_in(jax.random.key(ev.seed), i))
    values.append(parallel.to_host(bpd)[parallel.to_host(batch["mask"])])
    done = sum(len(v) for v in values)
    logging.info("bits/dim: %d examples, running mean %.4f (%.0f s)", done,
                 np.concatenate(values).mean(), time.perf_counter() - start)
    if ev.bpd_max_examples and done >= ev.bpd_max_examples:
      break
  values = np.concatenate(values).astype(np.float64)
  if ev.bpd_max_examples:
    values = values[:ev.bpd_max_examples]
  return {"bits_per_dim": float(values.mean()), "std": float(values.std()),
          "num_examples": int(len(values)), "split": config.data.eval_split,
          "max_examples": ev.bpd_max_examples, "variance": config.sample.variance,
          "clip_denoised": False, "seed": ev.seed, "batch_size": ev.bpd_batch_size}


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


def _reference(config: ml_collections.ConfigDict, workdir: str, extractor
               ) -> tuple[stats.FeatureStats, Any, dict[str, Any]]:
  """The configured reference file, or the cached/computed one in <workdir>/eval/."""
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.evaluation import reference
  ev = config.eval
  path, computed = _reference_path(config, workdir)
  if computed:
    # Every process computes the same statistics and uses its own copy (other
    # hosts may not see process 0's file, or not yet).
    ref, feats, meta = reference.compute_reference(
        config.data, ev.reference_split, extractor, batch_size=ev.batch_size,
        max_examples=ev.reference_max_examples, keep_features=ev.pr_num_real)
    if jax.process_index() == 0:
      stats.save_stats(path, ref, meta, feats)
  else:
    ref, meta, feats = stats.load_stats(path)
  _check_reference_matches(path, ref, meta, extractor.describe()["weights_sha256"],
                           cached=not ev.fid_reference)
  return ref, feats, {"path": os.path.abspath(path), "num_examples": ref.num_examples,
                      "meta": meta}


def _inception_metrics(config: ml_collections.ConfigDict, workdir: str, images: np.ndarray,
                       wanted: list[str], report: dict[str, Any]) -> None:
  """Fills report["metrics"] with the wanted of fid/is/pr, or lists them as skipped."""
  ev = config.eval
  if not ev.inception_weights:
    for m in wanted:
      report["skipped"][m] = ("no Inception weights configured (config.eval."
                              "inception_weights); see diffusion_jax/evaluation/inception.py")
    logging.warning("Skipping %s: no Inception weights configured (config.eval."
                    "inception_weights=''); nothing is estimated in their place.", wanted)
    return
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax.evaluation import inception, precision_recall
  extractor = inception.InceptionFeatures(ev.inception_weights, ev.batch_size)
  report["feature_network"] = extractor.describe()
  pool3, logits = extractor(images)
  m = report["metrics"]
  if "is" in wanted:
    mean, std = stats.inception_score(logits, IS_SPLITS)
    m["is"] = {"mean": mean, "std": std, "splits": IS_SPLITS, "num_samples": len(images)}
  if "fid" not in wanted and "pr" not in wanted:
    return
  ref, ref_feats, report["reference"] = _reference(config, workdir, extractor)
  if "fid" in wanted:
    note = stats.rank_deficiency_note(len(images), pool3.shape[1])
    if note:
      report["warnings"].append("fid: " + note)
    m["fid"] = stats.stats_distance(stats.feature_statistics(pool3), ref)
  if "pr" in wanted:
    if ref_feats is None:
      report["skipped"]["pr"] = "the reference file holds no features (only mu/sigma)"
      logging.warning("Skipping pr: %s.", report["skipped"]["pr"])
    else:
      m["pr"] = {**precision_recall.precision_recall(ref_feats, pool3, k=ev.pr_k),
                 "k": ev.pr_k, "num_real": len(ref_feats), "num_samples": len(images)}


def _generate(model, params, config: ml_collections.ConfigDict, mesh
              ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(uint8 [N, H, W, C] samples, int32 [N] labels or None if unconditional)."""
  ev = config.eval
  sample_fn = sample.make_sample_fn(model, builders.make_schedule(config), config,
                                    ev.batch_size, mesh)
  if not config.model.num_classes:
    return sample.generate(sample_fn, params, ev.num_samples, ev.batch_size, ev.seed,
                           config.sample.eta), None
  labels = sample.sample_labels(config, ev.num_samples)
  return sample.generate(sample_fn, params, ev.num_samples, ev.batch_size, ev.seed,
                         config.sample.eta, labels=labels), labels


def _sample_metrics(model, params, config: ml_collections.ConfigDict, mesh, workdir: str,
                    name: str, report: dict[str, Any]) -> None:
  """Draws the eval samples and fills report["metrics"] with the sample metrics."""
  ev = config.eval
  wanted = [m for m in ev.metrics if m != "bpd"]
  start = time.perf_counter()
  images, labels = _generate(model, params, config, mesh)
  report["timing_seconds"]["sampling"] = round(time.perf_counter() - start, 1)
  if ev.save_samples and jax.process_index() == 0:
    report["samples_file"] = npz_io.write_samples(
        os.path.join(workdir, "eval", name + ".npz"), images, labels)
  start = time.perf_counter()
  if "digits_fd" in wanted:
    _digits_metrics(config, images, labels, report)
  inception_wanted = [m for m in wanted if m in INCEPTION_METRICS]
  if inception_wanted:
    _inception_metrics(config, workdir, images, inception_wanted, report)
  report["timing_seconds"]["sample_metrics"] = round(time.perf_counter() - start, 1)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Eval mode; returns the report (also written to <workdir>/eval/report_<name>.json)."""
  config = with_eval_defaults(config)
  _check(config, workdir)
  checkpointing.check_compatible(workdir, config)
  _check_sample_request(config, workdir)
  model, params, step, mesh = builders.restore_ema(config, workdir, config.sample.checkpoint_step)
  logging.info("Eval: restored EMA parameters of step %d from %s", step, workdir)
  ev, name = config.eval, report_name(config, step)
  report = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step),
            "params": "ema", "sampler": _sampler_settings(config),
            "num_samples": ev.num_samples, "seed": ev.seed,
            "data": {k: config.data[k] for k in ("name", "data_dir", "image_size",
                                                 "channels", "train_split", "eval_split")},
            "metrics_requested": list(ev.metrics), "metrics": {}, "skipped": {},
            "warnings": [], "feature_network": None, "reference": None,
            "timing_seconds": {}, "jax_version": jax.__version__,
            "device_count": jax.device_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if any(m != "bpd" for m in ev.metrics):
    _sample_metrics(model, params, config, mesh, workdir, name, report)
  if "bpd" in ev.metrics and config.model.num_classes:
    # The bound of a conditional model needs its labels threaded through
    # likelihood.vb_terms' timestep chunks; not done yet, so not guessed.
    report["skipped"]["bpd"] = "not implemented for class-conditional models"
    logging.warning("Skipping bpd: %s.", report["skipped"]["bpd"])
  elif "bpd" in ev.metrics:
    start = time.perf_counter()
    report["metrics"]["bpd"] = bits_per_dim_on_split(model, params, config, mesh)
    report["timing_seconds"]["bpd"] = round(time.perf_counter() - start, 1)
  for warning in report["warnings"]:
    logging.warning("%s", warning)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval", f"report_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    report["report_file"] = path
    logging.info("Eval report written to %s:\n%s", path,
                 json.dumps(report["metrics"], indent=2, sort_keys=True))
  return report
