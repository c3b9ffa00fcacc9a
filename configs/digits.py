"""The offline CPU default: a small U-Net on 16x16 handwritten digits.

Builds the `digits` data set from scikit-learn's bundled images on first use
(no network). About 10 minutes on a 2-core CPU, sampling included.
"""
from configs import default


def get_config():
  config = default.get_config()
  # default.py is already sized for this run; the values are repeated here
  # so this file states the recipe it trains.
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.patch_size = 2
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.training.batch_size = 64
  config.training.num_train_steps = 4000
  config.sample.method = "ddim"
  config.sample.num_steps = 50
  return config
