"""Full-scale 64 -> 256 text-conditioned super-resolution stage (GLIDE / Imagen size).

Follows configs/text2image64.py in a cascade:

  python -m diffusion_jax.main --mode=sample --workdir=OUT \\
      --config=configs/cascade.py:BASE64_DIR,SR256_DIR --config.cascade.captions=@captions.txt

* Input: the 64x64 image (box-filtered from each 256x256 one by the input
  pipeline; the base model's sample at sampling time), upsampled bilinearly
  and concatenated with x_t, plus its noise-augmentation level.
* Noise-conditioning augmentation as Imagen: training levels uniform over the
  whole schedule, sampling at the fixed level 0.2; Gaussian blur augmentation
  (sigma 0.4-0.6, CDM) on half of the training examples.
* U-Net: ch 128, ch_mult (1, 2, 4, 4, 8), 2 res blocks, no self-attention at
  high resolution (as GLIDE's and Imagen's upsamplers); text cross-attention
  at 32 and 16 through the same frozen encoder as the base.
"""
from configs import text2image64


def get_config():
  config = text2image64.get_config()
  config.data.image_size = 256
  config.data.low_res_size = 64
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 128, (1, 2, 4, 4, 8), 2
  m.attn_resolutions = (16,)
  m.cross_attn_resolutions = (32, 16)
  m.low_res_channels = 3
  m.low_res_upsample = "bilinear"
  sr = config.superres
  sr.noise_aug_max, sr.sample_aug_level = 1.0, 0.2
  sr.blur_prob, sr.blur_sigma_min, sr.blur_sigma_max = 0.5, 0.4, 0.6
  config.training.batch_size = 512
  config.sample.guidance_scale = 1.0  # Imagen guides the upsamplers weakly, if at all
  return config
