"""A CLIP on the offline `shapes` set: the first model of unCLIP (CPU-sized).

A ViT (32x32 images in 4x4 patches, 2 layers, width 64) and a causal byte-level
text transformer (2 layers, width 64), both projected to 64-wide embeddings
and trained by CLIP's symmetric contrastive loss with a learned temperature.
Repeats of one caption in a batch are not counted as negatives
(clip/loss.py); the shapes set has a few thousand distinct captions.

  python -m diffusion_jax.main --config=configs/shapes_clip.py --workdir=workdir/clip
"""
from configs import default


def get_config():
  config = default.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "shapes", 32, 3, 0
  d.caption_key = "caption"
  d.random_flip = False  # a flip would swap "left of" in the caption
  config.model.name = "clip"
  c = config.model.clip
  c.embed_dim, c.image_size, c.patch_size = 64, 32, 4
  c.vision_width, c.vision_layers, c.vision_heads = 64, 2, 4
  c.context_length = 72  # the longest shapes caption is 63 bytes
  c.text_width, c.text_layers, c.text_heads = 64, 2, 4
  o = config.optim
  o.optimizer, o.lr, o.weight_decay, o.warmup_steps = "adamw", 1e-3, 0.05, 200
  o.lr_schedule = "cosine"
  o.ema_decay = 0.995
  t = config.training
  t.batch_size = 256  # contrastive learning wants many negatives per batch
  t.num_train_steps = 1500
  t.log_every_steps = 100
  t.checkpoint_every_steps = 500
  t.sample_every_steps = 0  # a CLIP draws no images
  return config
