"""unCLIP's diffusion prior on `shapes`: caption -> CLIP image embedding (CPU-sized).

DALL-E 2's prior (models/prior.py): a causal Transformer over [the caption's CLIP
token states, its CLIP text embedding, the timestep, the noisy image
embedding, a query], predicting the clean embedding (x0), captions dropped 10%
for classifier-free guidance. Its diffusion state is the CLIP image embedding
of each training image, scaled to norm sqrt(64). The CLIP is the argument:

  python -m diffusion_jax.main --workdir=workdir/prior \\
      --config=configs/shapes_unclip_prior.py:workdir/clip
"""
from configs import default


def get_config(clip_workdir: str = "workdir/clip"):
  config = default.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "shapes", 32, 3, 0
  d.caption_key = "caption"
  d.random_flip = False
  config.model.name = "prior"
  p = config.model.prior
  p.embed_dim, p.text_width, p.max_text_length = 64, 64, 72  # configs/shapes_clip.py's
  # 2 layers: the 72 caption positions make each layer cost about as much as the
  # decoder's U-Net per example (4 layers at batch 128 ran at 0.3 steps/s here).
  p.width, p.num_layers, p.num_heads = 128, 2, 4
  c = config.conditioning
  c.type, c.clip_workdir, c.p_uncond = "clip_text", clip_workdir, 0.1
  df = config.diffusion
  df.schedule, df.prediction = "cosine", "x0"  # DALL-E 2 predicts the embedding itself
  config.optim.lr, config.optim.warmup_steps = 5e-4, 200
  t = config.training
  t.batch_size, t.num_train_steps = 64, 2000
  t.log_every_steps, t.checkpoint_every_steps = 100, 1000
  t.sample_every_steps = 0  # embeddings, not images
  s = config.sample
  s.method, s.num_steps, s.thresholding = "ddim", 64, "none"  # DALL-E 2: 64 strided steps
  s.guidance_scale = 1.0
  s.num_samples = s.batch_size = 64
  return config
