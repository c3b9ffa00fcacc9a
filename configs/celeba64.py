"""A 64x64 variant: CelebA centre-cropped to 64x64 (as DDIM's CelebA runs).

The DDPM U-Net with one more resolution level than CIFAR-10:
ch 128, ch_mult (1, 2, 2, 2, 4), 2 res blocks, attention at 16x16, dropout 0.1.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.name = "celeb_a"
  config.data.image_size = 64
  config.data.num_classes = 0
  config.data.eval_split = "validation"
  config.model.ch_mult = (1, 2, 2, 2, 4)
  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  config.sample.num_samples = 10_000
  config.sample.batch_size = 500
  return config
