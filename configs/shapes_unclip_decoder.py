"""unCLIP's decoder on `shapes`: CLIP image embedding -> 32x32 image (CPU-sized).

The shapes text U-Net (configs/shapes_text_glide.py's, cross-attention at 16
and 8) conditioned on the CLIP image embedding instead of a caption: projected
and added to the timestep embedding, and projected to 4 cross-attention
tokens (DALL-E 2). Embeddings are dropped (zeroed) 10% of the time, so the
decoder can be guided. The CLIP is the argument:

  python -m diffusion_jax.main --workdir=workdir/decoder \\
      --config=configs/shapes_unclip_decoder.py:workdir/clip
"""
from configs import shapes_text_glide


def get_config(clip_workdir: str = "workdir/clip"):
  config = shapes_text_glide.base_config()
  m = config.model
  m.name = "unet"
  m.image_embed_dim, m.image_embed_tokens = 64, 4
  m.cross_attn_dim, m.cond_vector_dim = 64, 0  # the tokens come from the embedding
  c = config.conditioning
  c.type, c.clip_workdir = "none", clip_workdir
  c.p_uncond_image_embed = 0.1
  config.data.caption_key = ""  # decoded from the embedding alone
  config.sample.guidance_scale = 1.0
  return config
