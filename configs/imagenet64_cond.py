"""Class-conditional ImageNet 64x64 with classifier-free guidance (ADM style).

The architecture of "Diffusion Models Beat GANs" (Dhariwal & Nichol 2021,
Table 11, ImageNet 64x64): ch 192, ch_mult (1, 2, 3, 4), 3 res blocks per
level, attention at 32, 16 and 8 with 64 channels per head, BigGAN-style
resampling ResBlocks, dropout 0.1, a class embedding; cosine schedule
(improved DDPM), Adam(W) 3e-4, batch 2048, EMA 0.9999. Classifier-free
guidance as Ho & Salimans (2021) trained it on ImageNet 64x64: labels dropped
with p_uncond 0.1, guided samples at scales around 1.3-4 (their w + 1).

Differences from ADM, stated: fixed variances (no learnt sigma, so no
hybrid loss), no scale-shift norm (the U-Net adds the embedding), and
guidance replaces ADM's separate classifier.

Data: TFDS `imagenet_resized/64x64` (1000 classes; 1,281,167 train and
50,000 validation images, box-downsampled by Chrabaszcz et al. 2017). Prepare
it once on a host with network:
  python -m diffusion_jax.datasets.prepare imagenet_resized/64x64 --data_dir=DIR
"""
from configs import default


def get_config():
  config = default.get_config()
  d = config.data
  d.name = "imagenet_resized/64x64"
  d.image_size = 64
  d.channels = 3
  d.num_classes = 1000
  d.random_flip = True
  d.eval_split = "validation"

  m = config.model
  m.ch = 192
  m.ch_mult = (1, 2, 3, 4)
  m.num_res_blocks = 3
  m.attn_resolutions = (32, 16, 8)
  m.head_dim = 64
  m.resblock_updown = True
  m.dropout = 0.1
  m.patch_size = 1
  m.num_classes = 1000
  m.dtype = "bfloat16"  # mixed precision on accelerators; parameters stay float32

  config.conditioning.type = "class"
  config.conditioning.p_uncond = 0.1

  df = config.diffusion
  df.schedule = "cosine"
  df.num_timesteps = 1000
  df.prediction = "eps"

  o = config.optim
  o.optimizer = "adamw"
  o.lr = 3e-4
  o.weight_decay = 0.0
  o.warmup_steps = 0
  o.grad_clip_norm = 1.0
  o.ema_decay = 0.9999
  o.ema_warmup = False

  t = config.training
  t.batch_size = 2048
  t.num_train_steps = 540_000
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5_000
  t.sample_every_steps = 20_000
  t.num_grid_samples = 100

  s = config.sample
  s.method = "ddim"
  s.num_steps = 250
  s.guidance_scale = 2.0
  s.thresholding = "static"
  s.labels = ""  # every class equally (50 each for 50,000 samples)
  s.num_samples = 50_000
  s.batch_size = 500
  return config
