"""A 16 -> 32 super-resolution stage for the offline shapes set (CPU-sized).

A U-Net like configs/shapes_text_glide.py's, without text: it is conditioned on
the 16x16 image (box-filtered from each 32x32 one by the input pipeline),
upsampled bilinearly and concatenated with x_t, and on its noise-augmentation
level (Cascaded Diffusion Models, Imagen): training corrupts the 16x16 input
by the forward process at a level uniform in [0, 0.5 T]; sampling applies the
fixed level 0.2 T to the base stage's output. Without augmentation:
`--config.superres.noise_aug_max=0 --config.superres.sample_aug_level=0`.
"""
from configs import shapes_text_glide


def get_config():
  config = shapes_text_glide.base_config()
  config.conditioning.type = "none"
  config.data.caption_key = ""
  m = config.model
  m.cross_attn_dim = m.cond_vector_dim = 0
  m.cross_attn_resolutions = ()
  # No stem: the U-Net runs at 32x32 on x_t and the upsampled input (6 channels),
  # so fine detail need not squeeze 24 values per position through 32 channels.
  m.patch_size, m.ch_mult, m.attn_resolutions = 1, (1, 2, 2), (8,)
  config.data.low_res_size = 16
  m.low_res_channels = 3
  m.low_res_upsample = "bilinear"
  config.superres.noise_aug_max = 0.5
  config.superres.sample_aug_level = 0.2
  config.sample.guidance_scale = 1.0
  return config
