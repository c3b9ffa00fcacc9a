"""A tiny config for tests: a few steps of a very small U-Net on digits."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.patch_size = 2
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 8
  config.training.num_train_steps = 6
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 3
  config.training.sample_every_steps = 6
  config.training.num_grid_samples = 8
  config.sample.num_steps = 5
  config.sample.num_samples = 10
  config.sample.batch_size = 8
  return config
