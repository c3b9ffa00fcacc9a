"""Eval metrics of conditional models: caption accuracy and super-resolution fidelity.

  caption_accuracy  text models on the offline `shapes` data: the fraction of
                    samples whose shapes, colours, sizes, count and relation
                    the shapes checker (shapes_checker.py) reads back from the
                    caption, over all captions and separately for seen and
                    held-out (colour, shape) combinations;
  psnr_ssim         super-resolution stages: PSNR and SSIM of each sample
                    against the real high-resolution image whose
                    low-resolution version it was conditioned on, beside the
                    same for plain bilinear and bicubic upsampling.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from diffusion_jax import run_logging, superres
from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import image_metrics, npz_io, shapes_checker


def caption_accuracy(images: np.ndarray, captions: Optional[Sequence[str]],
                     data_name: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  """(the figures, None) or (None, why they were skipped).

  Args:
    images: uint8 [N, H, W, C] samples.
    captions: the N captions they were drawn for (None: not a text model).
    data_name: `config.data.name`; the checker reads only `shapes` images.
  """
  if captions is None:
    return None, "needs a text-conditioned model (captions to check)"
  side = shapes.IMAGE_SIZE
  if data_name != "shapes" or images.shape[1:] != (side, side, 3):
    return None, (f"needs the {side}x{side}x3 'shapes' data set, whose captions the "
                  f"checker reads (data.name={data_name!r}, images {images.shape[1:]})")
  held_out = np.array([shapes.is_held_out(shapes.parse_caption(c)) for c in captions])
  scores = shapes_checker.score_subsets(images, list(captions), held_out)
  return {**scores, "num_samples": len(images), "num_held_out": int(held_out.sum()),
          "num_distinct_captions": len(set(captions))}, None


def superres_quality(images: np.ndarray, real: Optional[np.ndarray],
                     low_res: Optional[np.ndarray]
                     ) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  """(PSNR/SSIM of samples and of plain upsampling, None) or (None, why skipped).

  Args:
    images: uint8 [N, S, S, C] samples of a super-resolution stage.
    real: uint8 [N, S, S, C], the real images whose low-resolution versions
      the samples were conditioned on (None: not a super-resolution stage).
    low_res: float32 [N, s, s, C] in [-1, 1], those low-resolution versions.
  """
  if real is None or low_res is None:
    return None, ("needs a super-resolution stage (samples to compare with the real "
                  "high-resolution images of their inputs)")
  images = npz_io.check_images(images, "samples")
  out = {"num_samples": len(images)}
  out.update(_pair_scores("", images, real))
  for method in ("bilinear", "bicubic"):
    up = run_logging.to_uint8(np.asarray(superres.upsample(low_res, images.shape[1], method)))
    out.update(_pair_scores(method + "_", up, real))
  return out, None


def _pair_scores(prefix: str, fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
  psnr, ssim = image_metrics.psnr(fake, real), image_metrics.ssim(fake, real)
  return {prefix + "psnr": float(np.mean(psnr)), prefix + "psnr_std": float(np.std(psnr)),
          prefix + "ssim": float(np.mean(ssim)), prefix + "ssim_std": float(np.std(ssim))}
