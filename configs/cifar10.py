"""DDPM's CIFAR-10 recipe (Ho et al. 2020, Appendix B).

35.7M-parameter U-Net (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention
at 16x16, dropout 0.1), T = 1000 linear schedule, eps-prediction, Adam 2e-4
with 5000 warm-up steps, grad-norm clip 1.0, batch 128, EMA 0.9999, random
horizontal flips, 800k steps; samples with the 1000-step ancestral sampler
and fixed-large variance (the paper's CIFAR-10 choice).

Prepare the data once (needs network):
  python -m diffusion_jax.datasets.prepare cifar10 --data_dir=DIR
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 10
  config.data.random_flip = True

  m = config.model
  m.ch = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.1
  m.num_heads = 1
  m.patch_size = 1

  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction = "eps"

  o = config.optim
  o.optimizer = "adam"
  o.lr = 2e-4
  o.warmup_steps = 5000
  o.grad_clip_norm = 1.0
  o.ema_decay = 0.9999
  o.ema_warmup = False  # the paper uses a fixed decay

  t = config.training
  t.batch_size = 128
  t.num_train_steps = 800_000
  t.log_every_steps = 100
  t.checkpoint_every_steps = 10_000
  t.sample_every_steps = 50_000
  t.num_grid_samples = 64

  s = config.sample
  s.method = "ancestral"
  s.num_steps = 0  # all 1000 steps
  s.variance = "fixed_large"
  s.num_samples = 50_000  # the paper's FID sample count
  s.batch_size = 1000
  return config
