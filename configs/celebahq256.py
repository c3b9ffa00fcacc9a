"""DDPM's 256x256 recipe (CelebA-HQ; LSUN in lsun_church256.py).

The paper's 256x256 U-Net: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks,
attention at 16x16, no dropout: 113,673,219 parameters (the paper's 114M).
Adam 2e-5, batch 64, EMA 0.9999, flips, 0.5M steps.

CelebA-HQ needs a manual download for TFDS (celeb_a_hq/256); then
  python -m diffusion_jax.datasets.prepare celeb_a_hq/256 --data_dir=DIR --manual_dir=DIR
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "celeb_a_hq/256"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.num_classes = 0
  config.data.random_flip = True

  m = config.model
  m.ch = 128
  m.ch_mult = (1, 1, 2, 2, 4, 4)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.0
  m.patch_size = 1

  o = config.optim
  o.lr = 2e-5
  o.warmup_steps = 5000
  o.ema_decay = 0.9999
  o.ema_warmup = False

  t = config.training
  t.batch_size = 64
  t.num_train_steps = 500_000
  t.checkpoint_every_steps = 10_000
  t.sample_every_steps = 50_000
  t.num_grid_samples = 16

  config.sample.method = "ancestral"
  config.sample.num_steps = 0
  config.sample.num_samples = 1000
  config.sample.batch_size = 64
  return config
