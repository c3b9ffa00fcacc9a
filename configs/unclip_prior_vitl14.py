"""Full-scale unCLIP prior: caption -> CLIP ViT-L/14 image embedding (DALL-E 2).

The paper's diffusion prior on the same code as configs/shapes_unclip_prior.py: a
decoder-only Transformer, 24 layers of width 2048 with 32 heads (about 1.2B
parameters; the paper's prior has 1B), over the caption's 77 CLIP token states
(768 wide), its text embedding, the timestep, the noisy image embedding and
a query; x0-prediction under a cosine schedule of 1000 steps, sampled with 64
strided DDIM steps; captions dropped 10% for guidance.

The CLIP is a Hugging Face `CLIPModel` folder (config.json, model.safetensors,
tokenizer.json; e.g. openai/clip-vit-large-patch14 saved with
`save_pretrained`), read without torch (diffusion_jax/clip/hf_weights.py):

  python -m diffusion_jax.main --workdir=workdir/prior_l14 \\
      --config=configs/unclip_prior_vitl14.py:/path/to/clip-vit-large-patch14

Data: any TFDS set with an RGB `image` and a string `caption` feature.
"""
from configs import default


def get_config(clip_path: str = "/path/to/clip-vit-large-patch14"):
  config = default.get_config()
  d = config.data
  d.name = "text_image_pairs"  # your prepared TFDS set (see configs/text2image64.py)
  d.image_size, d.channels, d.num_classes = 224, 3, 0  # what the CLIP embeds
  d.caption_key, d.random_flip, d.worker_count = "caption", False, 8
  config.model.name = "prior"
  p = config.model.prior
  p.embed_dim, p.text_width, p.max_text_length = 768, 768, 77  # ViT-L/14
  p.width, p.num_layers, p.num_heads, p.dropout = 2048, 24, 32, 0.0
  p.dtype = "bfloat16"
  c = config.conditioning
  c.type, c.clip_path, c.p_uncond = "clip_text", clip_path, 0.1
  c.text_cache_size = 20_000  # 77 x 768 floats (237 KB) per caption
  df = config.diffusion
  df.schedule, df.prediction = "cosine", "x0"
  o = config.optim
  o.optimizer, o.lr, o.weight_decay, o.warmup_steps = "adamw", 1.1e-4, 6e-2, 10_000
  o.ema_decay, o.ema_warmup = 0.9999, False
  t = config.training
  t.batch_size, t.num_train_steps, t.checkpoint_every_steps = 4096, 1_000_000, 10_000
  t.sample_every_steps = 0
  s = config.sample
  s.method, s.num_steps, s.thresholding, s.guidance_scale = "ddim", 64, "none", 1.0
  return config
