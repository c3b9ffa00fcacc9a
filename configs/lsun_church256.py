"""DDPM's LSUN Church 256x256 run: the 256x256 recipe on TFDS lsun/church_outdoor.

Images are centre-cropped and resized to 256x256 by the input pipeline.
The paper trained LSUN Church for 1.2M steps.
"""
from configs import celebahq256


def get_config():
  config = celebahq256.get_config()
  config.data.name = "lsun/church_outdoor"
  config.data.eval_split = "validation"
  config.training.num_train_steps = 1_200_000
  return config
