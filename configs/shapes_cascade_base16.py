"""The base stage of a shapes text-to-image cascade: 16x16, frozen text encoder.

configs/shapes_text_frozen.py at 16x16 (the 32x32 images box-filtered to
16x16 by the input pipeline) with no stem (patch_size 1): the U-Net runs at
16x16 as there, on a quarter of the input values.
configs/shapes_sr32.py upsamples its samples to 32x32; sample both with

  python -m diffusion_jax.main --mode=sample --workdir=OUT \\
      --config=configs/cascade.py:BASE_DIR,SR_DIR \\
      --config.cascade.captions='a large red circle;a small blue square'
"""
from configs import shapes_text_frozen


def get_config():
  config = shapes_text_frozen.get_config()
  config.data.image_size = 16
  config.model.patch_size = 1
  return config
