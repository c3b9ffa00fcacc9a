"""unCLIP (DALL-E 2, Ramesh et al. 2022): a CLIP, a diffusion prior, a decoder.

  clip_encoder.py  FrozenCLIP: a CLIP trained here (a workdir) or a Hugging Face
                   CLIPModel folder, as host-side encoders of images and captions
  pipeline.py      captions -> prior -> image embeddings -> decoder (-> upsamplers);
                   image variations and interpolations (slerp)

The CLIP itself is `clip/`; the prior network `models/prior.py`; the decoder is
the U-Net with `model.image_embed_dim > 0`. What each model is conditioned on
lives in `conditioning/clip_text.py` (the prior) and
`conditioning/image_embedding.py` (the decoder).
"""
