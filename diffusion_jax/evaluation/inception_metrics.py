"""FID, Inception Score and precision/recall in eval mode: checks, reference, metrics.

The Inception network and the reference statistics are loaded only when one of
these metrics is asked for with weights configured (config.eval.inception_weights);
without weights the metrics are listed as skipped, never estimated another way.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import stats

INCEPTION_METRICS = ("fid", "is", "pr")
IS_SPLITS = 10


def check_request(config: ml_collections.ConfigDict, workdir: str) -> None:
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
    input_pipeline.check_split(config.data, ev.reference_split, "config.eval.reference_split")
    return
  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
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
  from diffusion_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
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




def reference_stats(config: ml_collections.ConfigDict, workdir: str, extractor
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




def inception_metrics(config: ml_collections.ConfigDict, workdir: str, images: np.ndarray,
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
  ref, ref_feats, report["reference"] = reference_stats(config, workdir, extractor)
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
