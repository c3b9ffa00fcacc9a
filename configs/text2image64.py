"""Full-scale text-to-image base model: 64x64, Imagen-like widths, frozen encoder.

The first stage of a 64 -> 256 cascade (configs/sr64to256.py upsamples it), on
the same code as the CPU configs (configs/shapes_text_frozen.py):

* U-Net: ch 256, ch_mult (1, 2, 3, 4), 3 res blocks, self-attention at 32, 16
  and 8, cross-attention to the text tokens at 32, 16 and 8 (64-wide heads),
  scale-shift norm, bf16 compute: 698M parameters (Imagen's 64x64 base has
  2B with ch 512; raise model.ch for that).
* Text: a frozen T5-XXL encoder, as Imagen (4096 wide), from
  `conditioning.frozen_encoder_path`: a Hugging Face checkpoint folder with
  config.json, model.safetensors (or its sharded index) and tokenizer.json
  (only the encoder's tensors are read; diffusion_jax/text/t5.py), in
  bfloat16. Some hub repos (google/t5-v1_1-xxl) ship only pytorch_model.bin
  and spiece.model: write the folder once with transformers,
  `T5EncoderModel.from_pretrained(name).save_pretrained(dir)` and
  `AutoTokenizer.from_pretrained(name).save_pretrained(dir)`. A BERT-family
  folder works too: set cross_attn_dim / cond_vector_dim to its width.
* Training: captions dropped with p 0.1, Adam 1e-4 with 10k warm-up steps,
  batch 2048, EMA 0.9999; sampling with guidance 5 and dynamic thresholding
  (Imagen's settings).

Data: any TFDS data set with an RGB `image` and a string `caption` feature,
prepared as array_record (see README); set --config.data.name.
"""
from configs import default


def get_config():
  config = default.get_config()
  d = config.data
  d.name = "text_image_pairs"  # your prepared TFDS set; see the docstring
  d.image_size, d.channels, d.num_classes = 64, 3, 0
  d.caption_key = "caption"
  d.random_flip = False  # captions may say "left" and "right"
  d.worker_count = 8
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 256, (1, 2, 3, 4), 3
  m.attn_resolutions = (32, 16, 8)
  m.cross_attn_resolutions = (32, 16, 8)
  m.head_dim = 64
  m.dropout = 0.1
  m.patch_size = 1
  m.scale_shift_norm = True
  m.resblock_updown = True
  m.dtype = "bfloat16"
  m.cross_attn_dim = m.cond_vector_dim = 4096  # T5-XXL's d_model
  c = config.conditioning
  c.type, c.text_encoder, c.p_uncond = "text", "frozen", 0.1
  c.text_max_length = 128
  c.frozen_encoder_path = "/path/to/t5-v1_1-xxl"
  c.frozen_encoder_dtype = "bfloat16"
  c.text_cache_size = 5_000  # 128 x 4096 floats (2 MB) per caption: 10 GB
  o = config.optim
  o.lr, o.warmup_steps, o.ema_decay, o.ema_warmup = 1e-4, 10_000, 0.9999, False
  t = config.training
  t.batch_size, t.num_train_steps = 2048, 2_500_000
  t.checkpoint_every_steps, t.sample_every_steps, t.num_grid_samples = 10_000, 50_000, 64
  s = config.sample
  s.method, s.num_steps = "dpm_solver++", 50
  s.guidance_scale, s.thresholding = 5.0, "dynamic"
  return config
