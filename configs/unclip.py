"""unCLIP (DALL-E 2) to sample: a prior's workdir, a decoder's, then upsamplers'.

  python -m diffusion_jax.main --mode=sample --workdir=OUT \\
      --config=configs/unclip.py:PRIOR_DIR,DECODER_DIR[,SR_DIR...] \\
      --config.unclip.captions='a large red circle;a small blue square'
  ... --config.unclip.mode=variations --config.unclip.source=SAMPLES.npz
  ... --config.unclip.mode=interpolations --config.unclip.source=SAMPLES.npz

`prior` and `stage_i` are the configs saved by each training run (missing
fields take their defaults), so their sampler settings can be overridden,
e.g. --config.prior.sample.guidance_scale=2 --config.stage_0.sample.num_steps=20.
See diffusion_jax/unclip/pipeline.py for the modes and what is written.
"""
import ml_collections

from configs import from_workdir


def get_config(workdirs: str):
  dirs = tuple(d for d in workdirs.split(",") if d)
  if len(dirs) < 2:
    raise ValueError(f"configs/unclip.py:PRIOR_DIR,DECODER_DIR[,SR_DIR...] needs at least a "
                     f"prior and a decoder workdir; got {workdirs!r}.")
  config = ml_collections.ConfigDict()
  config.unclip = u = ml_collections.ConfigDict()
  u.prior_workdir, u.stage_workdirs = dirs[0], dirs[1:]
  u.mode = "captions"  # "captions", "variations" or "interpolations"
  u.prior = "diffusion"  # "none": the caption's CLIP text embedding in its place
  u.captions = "a large red circle;a small blue square above a small green triangle"
  u.num_samples = 64
  u.batch_size = 64  # Global per-call batch of every model; must divide over devices.
  u.seed = 0  # Stage i uses seed + i, the prior seed + 100.
  u.source = ""  # variations / interpolations: an .npz of images (arr_0 uint8)
  u.num_variations = 4
  u.num_pairs = 2
  u.interpolation_steps = 8
  u.name = "unclip"
  config.prior = from_workdir.get_config(dirs[0])
  for i, d in enumerate(dirs[1:]):
    config[f"stage_{i}"] = from_workdir.get_config(d)
  return config
