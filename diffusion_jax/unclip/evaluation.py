"""What unCLIP's parts and pipeline are measured by (eval mode and benchmarks).

  clip_retrieval   a CLIP: zero-shot caption retrieval, each eval image against
                   every distinct eval caption (top-1), seen and held-out
  prior_figures    the prior: cosine similarity of its sampled embeddings to the
                   true image embeddings of the same captions, beside the
                   caption's text embedding (the "no prior" baseline)
  diversity        mean pairwise distance among samples of one caption, in CLIP
                   image-embedding space (1 - cos) and in pixels (RMS)
  evaluate_unclip  --mode=eval on an unCLIP config: the pipeline on the eval
                   split's captions, scored by the shapes checker, plus diversity
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from diffusion_jax import input_pipeline, run_logging
from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import conditional_metrics
from diffusion_jax.unclip import pipeline
from diffusion_jax.unclip.clip_encoder import FrozenCLIP


def eval_split(data_config: ml_collections.ConfigDict, max_examples: int = 0
               ) -> tuple[np.ndarray, list[str]]:
  """(float32 [N, H, W, C] in [-1, 1], N captions) of the eval split, in order."""
  images, captions = [], []
  for batch in input_pipeline.create_eval_iterator(data_config, 256, process_index=0,
                                                   process_count=1):
    keep = np.asarray(batch["mask"])
    images.append(np.asarray(batch["image"])[keep])
    captions += [c.decode() if isinstance(c, bytes) else str(c)
                 for c in np.asarray(batch["caption"])[keep]]
    if max_examples and len(captions) >= max_examples:
      break
  n = max_examples or len(captions)
  return np.concatenate(images)[:n], captions[:n]


def _held_out(captions: Sequence[str]) -> np.ndarray:
  return np.array([shapes.is_held_out(shapes.parse_caption(c)) for c in captions])


def _split_mean(values: np.ndarray, held_out: np.ndarray) -> dict[str, float]:
  out = {"all": float(np.mean(values))}
  for name, sel in (("seen", ~held_out), ("held_out", held_out)):
    if sel.any():
      out[name] = float(np.mean(values[sel]))
  return out


def clip_retrieval(clip: FrozenCLIP, images: np.ndarray, captions: Sequence[str]
                   ) -> dict[str, Any]:
  """Top-1 zero-shot caption retrieval: each image against every distinct caption.

  Args:
    clip: the CLIP.
    images: float32 [N, H, W, C] in [-1, 1].
    captions: their N captions (shapes captions: seen / held-out is read off them).
  """
  distinct = sorted(set(captions))
  img = clip.image_embeddings(images)
  txt = clip.text(distinct)["text_embed"]
  best = np.argmax(img @ txt.T, axis=1)
  correct = np.array([distinct[b] == c for b, c in zip(best, captions)], np.float64)
  return {"top1": _split_mean(correct, _held_out(captions)), "num_images": len(captions),
          "num_distinct_captions": len(distinct)}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, axis=-1)


def prior_figures(clip: FrozenCLIP, embeds: np.ndarray, images: np.ndarray,
                  captions: list[str]) -> dict[str, Any]:
  """How close a prior's embeddings come to the true image embeddings.

  Args:
    clip: the CLIP.
    embeds: float32 [N, D], the prior's samples for `captions`.
    images: float32 [N, H, W, C] in [-1, 1], the eval images of those captions.
    captions: N captions.
  """
  true = clip.image_embeddings(images)
  held = _held_out(captions)
  text = clip.text(captions)["text_embed"]
  return {"cos_to_image": _split_mean(_cosine(embeds, true), held),
          "cos_text_embedding_to_image": _split_mean(_cosine(text, true), held),
          "caption_retrieval": _retrieves(clip, embeds, captions, held)}


def _retrieves(clip: FrozenCLIP, embeds: np.ndarray, captions: list[str],
               held: np.ndarray) -> dict[str, float]:
  distinct = sorted(set(captions))
  txt = clip.text(distinct)["text_embed"]
  best = np.argmax(embeds @ txt.T, axis=1)
  return _split_mean(np.array([distinct[b] == c for b, c in zip(best, captions)], float),
                     held)


def diversity(clip: FrozenCLIP, images: np.ndarray, captions: Sequence[str]
              ) -> dict[str, float]:
  """Mean pairwise distance among the samples of each caption, over captions.

  Args:
    clip: the CLIP whose image embeddings measure semantic distance.
    images: uint8 [N, H, W, C] samples.
    captions: their captions; captions with one sample are left out.

  Returns:
    `clip_distance` (1 - cosine of CLIP image embeddings), `pixel_rms` (RMS
    difference in [0, 1] units), `num_groups`.
  """
  emb = clip.image_embeddings(images.astype(np.float32) / 127.5 - 1.0)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  pix = images.astype(np.float64) / 255.0
  groups: dict[str, list[int]] = {}
  for i, c in enumerate(captions):
    groups.setdefault(c, []).append(i)
  clip_d, pix_d = [], []
  for idx in groups.values():
    if len(idx) < 2:
      continue
    pairs = list(itertools.combinations(idx, 2))
    clip_d.append(np.mean([1.0 - emb[i] @ emb[j] for i, j in pairs]))
    pix_d.append(np.mean([np.sqrt(np.mean((pix[i] - pix[j]) ** 2)) for i, j in pairs]))
  if not clip_d:
    raise ValueError("diversity needs at least one caption with two or more samples.")
  return {"clip_distance": float(np.mean(clip_d)), "pixel_rms": float(np.mean(pix_d)),
          "num_groups": len(clip_d)}


def evaluate_unclip(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval on an unCLIP config: the eval split's first `unclip.num_samples`
  captions through prior and decoder; caption accuracy, diversity, prior figures."""
  # pylint: disable-next=g-import-not-at-top  (evaluate imports this module lazily)
  from diffusion_jax import evaluate
  pipeline.check(config)
  u, final = config.unclip, pipeline.stage_configs(config)[-1]
  images, captions = eval_split(config.prior.data, u.num_samples)
  start = time.perf_counter()
  embeds = pipeline.prior_embeddings(config, captions)
  outputs = pipeline.decode(config, embeds, captions)
  report = {"workdir": workdir, "unclip": u.to_dict(), "num_samples": len(captions),
            "metrics": {}, "skipped": {}, "warnings": [],
            "timing_seconds": {"sampling": round(time.perf_counter() - start, 1)}}
  acc, why = conditional_metrics.caption_accuracy(outputs[-1], captions, final.data.name)
  report["metrics"]["caption_accuracy"] = acc
  if why:
    report["skipped"]["caption_accuracy"] = why
  clip = FrozenCLIP.from_config(config.stage_0)
  if len(set(captions)) < len(captions):
    report["metrics"]["diversity"] = diversity(clip, outputs[-1], captions)
  report["metrics"]["embeddings"] = prior_figures(clip, embeds, images, captions)
  name = f"{u.name}_{u.prior}_n{len(captions)}_seed{u.seed}"
  evaluate.write_report(report, workdir, name)
  if u.num_samples:
    run_logging.save_image_grid(f"{workdir}/eval/{name}.png", outputs[-1][:64], nrow=8)
  return report


def clip_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval on a CLIP workdir: caption retrieval on its eval split."""
  # pylint: disable-next=g-import-not-at-top
  from diffusion_jax import evaluate
  probe = ml_collections.ConfigDict({"conditioning": {"clip_workdir": workdir,
                                                      "clip_path": ""}})
  clip = FrozenCLIP.from_config(probe)
  images, captions = eval_split(config.data, config.eval.num_samples)
  report = {"workdir": workdir, "warnings": [],
            "metrics": {"retrieval": clip_retrieval(clip, images, captions)}}
  evaluate.write_report(report, workdir, f"clip_n{len(captions)}")
  return report
