"""CLIP: a contrastive text-image model (HF `CLIPModel` layout), its loss and HF I/O.

  module = CLIP()                                   # small, for the shapes data set
  image_emb, text_emb, logit_scale = module.apply(variables, pixels, ids, mask)
  loss, metrics = contrastive_loss(image_emb, text_emb, logit_scale, text_ids=ids)

`load_hf_clip(dir)` / `save_hf_clip(module, params, dir)` read and write a HF
`CLIPModel` folder (config.json + model.safetensors, no torch); `hf_clip_tokenizer(dir)`
runs its tokenizer.json. `preprocess` maps [-1, 1] images to the model's pixels.
"""
from diffusion_jax.clip.hf_weights import (hf_clip_tokenizer, hf_name, load_hf_clip,
                                           save_hf_clip)
from diffusion_jax.clip.loss import contrastive_loss, same_caption
from diffusion_jax.clip.model import CLIP, CLIP_MEAN, CLIP_STD, preprocess

__all__ = ["CLIP", "CLIP_MEAN", "CLIP_STD", "contrastive_loss", "hf_clip_tokenizer",
           "hf_name", "load_hf_clip", "preprocess", "same_caption", "save_hf_clip"]
