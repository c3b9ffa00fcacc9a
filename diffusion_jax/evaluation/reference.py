"""Reference statistics of real images: Inception features of a TFDS split, saved to .npz.

A run compares against one fixed file, so FIDs of different checkpoints (and
different runs) share a reference. The images go through the same input
pipeline as training (centre crop and resize to `data.image_size`), then back
to uint8, so real and generated images reach the network at the same size.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import input_pipeline, run_logging
from diffusion_jax.evaluation import inception, stats


def default_path(workdir: str, data_config: ml_collections.ConfigDict, split: str,
                 max_examples: int = 0) -> str:
  """Where eval mode caches the reference of a split: <workdir>/eval/reference_*.npz.

  The name holds everything that selects the images, so a changed setting
  never silently reuses another setting's statistics.
  """
  name = data_config.name.replace("/", "_")
  cap = f"_first{max_examples}" if max_examples else ""
  return os.path.join(workdir, "eval", f"reference_{name}_{split}{cap}_"
                      f"{data_config.image_size}px_inception.npz")


def real_images(data_config: ml_collections.ConfigDict, split: str, batch_size: int,
                max_examples: int = 0):
  """Yields uint8 [b, S, S, C] batches of a split in order (mask applied), up to a cap."""
  it = input_pipeline.create_eval_iterator(data_config, batch_size, split=split,
                                           process_index=0, process_count=1)
  seen = 0
  for batch in it:
    images = run_logging.to_uint8(batch["image"][batch["mask"]])  # exact: k/127.5-1 -> k
    if max_examples:
      images = images[:max_examples - seen]
    seen += len(images)
    if len(images):
      yield images
    if max_examples and seen >= max_examples:
      return


def compute_reference(data_config: ml_collections.ConfigDict, split: str,
                      extractor: inception.InceptionFeatures, *, batch_size: int = 200,
                      max_examples: int = 0, keep_features: int = 10000
                      ) -> tuple[stats.FeatureStats, Optional[np.ndarray], dict[str, Any]]:
  """Inception pool3 statistics of a split.

  Every process reads the whole split and computes the same numbers; callers
  write the file from process 0.

  Args:
    data_config: the `config.data` section.
    split: TFDS split, e.g. "train" (CIFAR-10 FIDs are against the 50k train set).
    extractor: the loaded FID Inception.
    batch_size: images per read.
    max_examples: cap on images; 0 reads the whole split.
    keep_features: how many raw features (the first ones) to keep for
      precision/recall; 0 keeps none.

  Returns:
    (stats, features [min(N, keep_features), 2048] or None, meta).
  """
  start = time.perf_counter()
  feats = []
  for images in real_images(data_config, split, batch_size, max_examples):
    feats.append(extractor(images)[0])
  features = np.concatenate(feats)
  ref = stats.feature_statistics(features)
  meta = dict(dataset=data_config.name, data_dir=data_config.data_dir, split=split,
              image_size=data_config.image_size, num_examples=ref.num_examples,
              max_examples=max_examples, feature_network=extractor.describe())
  logging.info("Reference statistics of %s[%s]: %d images in %.0f s.", data_config.name,
               split, ref.num_examples, time.perf_counter() - start)
  return ref, (features[:keep_features] if keep_features else None), meta
