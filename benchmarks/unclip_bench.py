"""unCLIP on the offline `shapes` set: CLIP retrieval, caption accuracy, diversity,
variations and interpolations (docs/benchmarks.md, "unCLIP").

  python benchmarks/unclip_bench.py --clip=W/clip --prior=W/prior --decoder=W/decoder \
      --frozen=W/frozen [--frozen_step=N] --out=docs

Prints one JSON line per measurement:
  clip_retrieval    top-1 of each test image against every distinct test caption
  caption_accuracy  the pipeline per (prior scale, decoder scale) ("captions"),
                    and the frozen-encoder (Imagen-style) model per scale
                    ("frozen"), on the first
                    --per_subset seen and held-out test captions, scored by the
                    exact shapes checker; "no prior" (the text embedding in the
                    image embedding's place) at the best decoder scale
  diversity         --groups captions x --per_group samples each, both models at
                    their best scales: mean pairwise distance within a caption,
                    in CLIP image-embedding space (1 - cos) and pixels (RMS)
  prior_embeddings  per prior scale: cosine of the prior's samples (and of the
                    caption's text embedding) to the test image's embedding,
                    and how often the sample retrieves its own caption
  variations        --per_subset test images, --num_variations each: how often a
                    variation keeps the source caption, and its pixel RMS to it
and writes unclip_variations.png and unclip_interpolations.png under --out.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# pylint: disable=g-import-not-at-top,wrong-import-position
from caption_bench import sample_single, test_captions
from configs import unclip as unclip_config
from diffusion_jax import run_logging, xla_flags
from diffusion_jax.datasets import shapes
from diffusion_jax.evaluation import shapes_checker
from diffusion_jax.unclip import evaluation, pipeline
from diffusion_jax.unclip.clip_encoder import FrozenCLIP


def _emit(**fields):
  print(json.dumps(fields), flush=True)


def _scores(images, captions, held_out):
  scores = shapes_checker.score_subsets(images, captions, held_out)
  return {f"{sub}_{k}": round(v, 4) for sub, d in scores.items() for k, v in d.items()}


def _config(args, prior_scale, decoder_scale, **fields):
  config = unclip_config.get_config(f"{args.prior},{args.decoder}")
  u = config.unclip
  u.batch_size, u.seed = args.batch, args.seed
  for k, v in fields.items():
    u[k] = v
  config.prior.sample.guidance_scale = prior_scale
  config.stage_0.sample.guidance_scale = decoder_scale
  config.stage_0.sample.num_steps = args.num_steps
  return config


def _pipeline(args, captions, prior_scale, decoder_scale, prior="diffusion"):
  config = _config(args, prior_scale, decoder_scale, prior=prior)
  embeds = pipeline.prior_embeddings(config, captions)
  return pipeline.decode(config, embeds, captions)[-1]


def _test_images(per_subset):
  """float32 [2n, 32, 32, 3] test images (n seen, n held out) and their captions."""
  test = shapes.make_split("test")
  seen = [e for e in test if not e["held_out"]][:per_subset]
  held = [e for e in test if e["held_out"]][:per_subset]
  chosen = seen + held
  images = np.stack([e["image"] for e in chosen]).astype(np.float32) / 127.5 - 1.0
  return images, [e["caption"] for e in chosen], np.array([e["held_out"] for e in chosen])


def prior_part(args, clip):
  """The prior's embeddings against the true image embeddings of test images."""
  images, captions, _ = _test_images(args.per_subset)
  for ps in (float(s) for s in args.prior_scales.split(",")):
    embeds = pipeline.prior_embeddings(_config(args, ps, 1.0), captions)
    _emit(bench="prior_embeddings", prior_scale=ps,
          **evaluation.prior_figures(clip, embeds, images, captions))


def clip_part(args, clip):
  test = shapes.make_split("test")
  images = np.stack([e["image"] for e in test]).astype(np.float32) / 127.5 - 1.0
  out = evaluation.clip_retrieval(clip, images, [e["caption"] for e in test])
  _emit(bench="clip_retrieval", workdir=args.clip, **out)


def caption_part(args):
  captions, held = test_captions(args.per_subset)
  best = {}
  for ps in (float(s) for s in args.prior_scales.split(",")):
    for ds in (float(s) for s in args.decoder_scales.split(",")):
      start = time.perf_counter()
      scores = _scores(_pipeline(args, captions, ps, ds), captions, held)
      _emit(bench="caption_accuracy", model="unclip", prior_scale=ps, decoder_scale=ds,
            seconds=round(time.perf_counter() - start, 1), **scores)
      best = max(best, dict(scores, ps=ps, ds=ds), key=lambda s: s.get("seen_caption", -1))
  scores = _scores(_pipeline(args, captions, 1.0, best["ds"], prior="none"), captions, held)
  _emit(bench="caption_accuracy", model="unclip_no_prior", decoder_scale=best["ds"], **scores)
  return best


def frozen_part(args):
  captions, held = test_captions(args.per_subset)
  frozen_best = {}
  for fs in (float(s) for s in args.frozen_scales.split(",")):
    start = time.perf_counter()
    images, step = sample_single(args.frozen, captions, fs, args.batch, args.seed,
                                 args.num_steps, args.frozen_step)
    scores = _scores(images, captions, held)
    _emit(bench="caption_accuracy", model="frozen", step=step, scale=fs,
          seconds=round(time.perf_counter() - start, 1), **scores)
    frozen_best = max(frozen_best, dict(scores, fs=fs), key=lambda s: s.get("seen_caption", -1))
  return frozen_best


def diversity_part(args, clip, best, frozen_best):
  captions, _ = test_captions(args.groups // 2)
  repeated = [c for c in captions for _ in range(args.per_group)]
  held = np.array([shapes.is_held_out(shapes.parse_caption(c)) for c in repeated])
  runs = {"unclip": _pipeline(args, repeated, best["ps"], best["ds"]),
          "frozen": sample_single(args.frozen, repeated, frozen_best["fs"], args.batch,
                                  args.seed + 1, args.num_steps, args.frozen_step)[0]}
  for name, images in runs.items():
    _emit(bench="diversity", model=name, **evaluation.diversity(clip, images, repeated),
          **_scores(images, repeated, held))
  return runs


def variations_part(args, clip, best):
  images, captions, held = _test_images(args.per_subset)
  k = args.num_variations
  path = os.path.join(tempfile.mkdtemp(), "source.npz")
  np.savez(path, arr_0=run_logging.to_uint8(images))
  config = _config(args, 1.0, best["ds"], mode="variations", source=path,
                   num_samples=len(images), num_variations=k, name="unclip_variations")
  (out_path,) = pipeline.sample_unclip(config, tempfile.mkdtemp())
  variations = np.load(out_path)["arr_0"]
  source = np.repeat(run_logging.to_uint8(images), k, axis=0)
  rms = np.sqrt(np.mean((variations / 255.0 - source / 255.0) ** 2, axis=(1, 2, 3)))
  _emit(bench="variations", num_sources=len(images), num_variations=k,
        decoder_scale=best["ds"], pixel_rms_to_source=round(float(rms.mean()), 4),
        **_scores(variations, [c for c in captions for _ in range(k)], np.repeat(held, k)))
  # The grid: rows of [source, its variations] for 8 sources.
  rows = []
  for i in range(8):
    rows += [run_logging.to_uint8(images[i])] + list(variations[i * k:(i + 1) * k])
  run_logging.save_image_grid(os.path.join(args.out, "unclip_variations.png"), np.stack(rows),
                              nrow=k + 1, upscale=2)
  interp = _config(args, 1.0, best["ds"], mode="interpolations", source=path, num_pairs=4,
                   interpolation_steps=8, name="unclip_interpolations")
  (ipath,) = pipeline.sample_unclip(interp, tempfile.mkdtemp())
  run_logging.save_image_grid(os.path.join(args.out, "unclip_interpolations.png"),
                              np.load(ipath)["arr_0"], nrow=8, upscale=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  for name in ("clip", "prior", "decoder", "frozen"):
    parser.add_argument(f"--{name}", required=True)
  parser.add_argument("--frozen_step", type=int, default=None)
  parser.add_argument("--out", default="docs")
  parser.add_argument("--prior_scales", default="1,2,4")
  parser.add_argument("--decoder_scales", default="1,3")
  parser.add_argument("--frozen_scales", default="1,3,5")
  parser.add_argument("--per_subset", type=int, default=64)
  parser.add_argument("--groups", type=int, default=16)
  parser.add_argument("--per_group", type=int, default=8)
  parser.add_argument("--num_variations", type=int, default=4)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--num_steps", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--parts", default="clip,prior,captions,frozen,diversity,variations")
  parser.add_argument("--prior_scale", type=float, default=1.0,
                      help="the pipeline's scales where the captions part is not run")
  parser.add_argument("--decoder_scale", type=float, default=1.0)
  parser.add_argument("--frozen_scale", type=float, default=3.0)
  args = parser.parse_args()
  xla_flags.apply_defaults()
  parts = args.parts.split(",")
  probe = unclip_config.get_config(f"{args.prior},{args.decoder}")
  clip = FrozenCLIP.from_config(probe.stage_0)
  if "clip" in parts:
    clip_part(args, clip)
  best = {"ps": args.prior_scale, "ds": args.decoder_scale}
  frozen_best = {"fs": args.frozen_scale}
  if "prior" in parts:
    prior_part(args, clip)
  if "captions" in parts:
    best = caption_part(args)
  if "frozen" in parts:
    frozen_best = frozen_part(args)
  if "diversity" in parts:
    diversity_part(args, clip, best, frozen_best)
  if "variations" in parts:
    variations_part(args, clip, best)


if __name__ == "__main__":
  main()
