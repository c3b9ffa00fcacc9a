"""Text-to-image on the offline `shapes` set, GLIDE style (CPU-sized).

32x32 pictures of one or two coloured shapes with captions such as "a small
red circle to the left of a large blue square". A byte-level transformer (2
layers, width 128) is trained jointly with the U-Net; its token states feed
cross-attention at 16x16 and 8x8 (inside the U-Net, after the 2x2 stem) and
its pooled state is added to the timestep embedding. Captions are dropped to
the empty caption with probability 0.1 (classifier-free guidance).

  python -m diffusion_jax.main --config=configs/shapes_text_glide.py --workdir=workdir/glide
  python -m diffusion_jax.main --mode=sample --workdir=workdir/glide \\
      --config=configs/from_workdir.py:workdir/glide --config.sample.guidance_scale=3 \\
      --config.sample.captions='a large red circle;a small blue square above a small green triangle'
"""
from configs import default


def base_config():
  """What both shapes text configs share: data, U-Net, training."""
  config = default.get_config()
  config.data.name = "shapes"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 0
  config.data.caption_key = "caption"
  config.data.random_flip = False  # a flip would swap "left of" in the caption
  m = config.model
  # A 2x2 space-to-depth stem: the U-Net runs at 16x16 (x 12 channels) with 32 and
  # 64 channels, 1.7 train steps/s on a 2-core CPU. (A 4x4 stem with 64 channels
  # ran at 1.9 steps/s, but its 48 input values per position barely fit through 64
  # channels, and its samples kept per-pixel noise after 1,700 steps.)
  m.ch, m.ch_mult, m.num_res_blocks = 32, (1, 2), 1
  m.patch_size = 2
  m.attn_resolutions = (8,)
  m.scale_shift_norm = True  # else GroupNorm(32) erases the text vector at 32 channels
  m.cross_attn_resolutions = (16, 8)
  m.head_dim = 32
  # Cosine, not DDPM's linear schedule: linear leaves abar_T = 4e-5, so x_T keeps a
  # trace of the image (sqrt(abar_T) x) that training lets the network read and
  # that pure N(0, I) noise at sampling does not have; cosine has abar_T ~ 0.
  config.diffusion.schedule = "cosine"
  # v-prediction (Salimans & Ho 2022): x0 = sqrt(abar) x_t - sqrt(1 - abar) v stays
  # well conditioned near T, where cosine's abar_999 = 2.4e-9 makes the eps route
  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiply eps errors by 2e4. With eps,
  # the 16->32 upsampler sampled at 8.4 dB PSNR after 500 steps (its first sampling
  # step saturates x0 into noise the later steps keep); with v, 29.9 dB.
  config.diffusion.prediction = "v"
  config.conditioning.type = "text"
  config.conditioning.p_uncond = 0.1
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  t = config.training
  t.batch_size = 64
  t.num_train_steps = 2000
  t.log_every_steps = 100
  t.checkpoint_every_steps = 500
  t.sample_every_steps = 1000
  t.num_grid_samples = 16
  s = config.sample
  s.method, s.num_steps = "ddim", 50
  s.guidance_scale = 3.0
  s.num_samples, s.batch_size = 64, 64
  return config


def get_config():
  config = base_config()
  m = config.model
  m.name = "text_unet"
  m.text_width, m.text_num_layers, m.text_num_heads = 128, 2, 4
  m.text_max_length = 72  # the longest shapes caption is 63 bytes
  m.cross_attn_dim = m.cond_vector_dim = m.text_width
  config.conditioning.text_encoder = "trained"
  return config
