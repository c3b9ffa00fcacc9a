"""Full-scale unCLIP decoder: a CLIP ViT-L/14 image embedding -> 64x64 image (DALL-E 2).

GLIDE's 64x64 U-Net as DALL-E 2 modifies it: ch 512, ch_mult (1, 2, 3, 4), 3
res blocks, attention at 32, 16 and 8 with 64-wide heads (the paper's decoder
has 3.5B parameters), a byte-level text transformer trained with it (24
layers of width 2048, as GLIDE's), and the CLIP image embedding projected and
added to the timestep embedding and projected to 4 extra context tokens.
Embeddings are zeroed 10% of the time and captions dropped 50% (the paper's
rates), so both can be guided. configs/sr64to256.py is the upsampler to
follow (DALL-E 2 has two, 64 -> 256 -> 1024).

  python -m diffusion_jax.main --workdir=workdir/decoder64 \\
      --config=configs/unclip_decoder64.py:/path/to/clip-vit-large-patch14
  python -m diffusion_jax.main --mode=sample --workdir=out \\
      --config=configs/unclip.py:workdir/prior_l14,workdir/decoder64,workdir/sr256
"""
from configs import text2image64


def get_config(clip_path: str = "/path/to/clip-vit-large-patch14"):
  config = text2image64.get_config()
  m = config.model
  m.name = "text_unet"
  m.ch = 512
  m.text_width, m.text_num_layers, m.text_num_heads = 2048, 24, 32
  m.text_max_length = 256  # bytes
  m.cross_attn_dim = m.cond_vector_dim = m.text_width
  m.image_embed_dim, m.image_embed_tokens = 768, 4  # ViT-L/14's embedding
  c = config.conditioning
  c.type, c.text_encoder, c.p_uncond = "text", "trained", 0.5
  c.frozen_encoder_path = ""
  c.clip_path, c.p_uncond_image_embed = clip_path, 0.1
  s = config.sample
  s.method, s.num_steps, s.guidance_scale, s.thresholding = "ddim", 250, 1.0, "static"
  return config
