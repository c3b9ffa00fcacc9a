"""Training a CLIP here (model.name = "clip"): its batches and its loss.

The trainer (train.py) runs a CLIP like any model: the same mesh, optimizer,
EMA, checkpoints and resume. What differs lives here: a batch's captions
become byte ids on the host (`prepare_batch`), and the step's loss is CLIP's
symmetric InfoNCE over the global batch (`loss_fn`), instead of Algorithm 1.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import numpy as np

from diffusion_jax.clip.loss import contrastive_loss
from diffusion_jax.text.tokenizers import ByteTokenizer


def prepare_batch(batch: dict[str, Any], context_length: int) -> dict[str, Any]:
  """Host side: captions (data.caption_key) -> `text_ids` [B, L] int32 and `text_mask`.

  Also `caption_id` [B] int32, a hash of each caption, so the loss and its
  accuracy can tell repeats of one caption apart from other captions.
  """
  batch = dict(batch)
  captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c)
              for c in batch.pop("caption")]
  ids, mask = ByteTokenizer().encode(captions, context_length)
  batch.update(text_ids=ids, text_mask=mask,
               caption_id=np.array([_stable_hash(c) for c in captions], np.int32))
  return batch


def _stable_hash(text: str) -> int:
  # Python's hash() of a str changes per process; every host must agree.
  h = 0
  for byte in text.encode("utf-8"):
    h = (h * 131 + byte) % 2_147_483_647
  return h


def loss_fn(model, config: ml_collections.ConfigDict) -> Callable:
  """(params, batch, rng) -> (loss, stats): CLIP's loss on one global batch."""
  del config

  def fn(params, batch, rng):
    del rng  # the CLIP here has no dropout
    image_emb, text_emb, logit_scale = model.apply(
        {"params": params}, batch["image"], batch["text_ids"], batch["text_mask"])
    # Captioned sets repeat captions within a batch: copies of an image's own
    # caption are positives too (soft targets), not negatives to push away.
    loss, stats = contrastive_loss(image_emb, text_emb, logit_scale,
                                   text_ids=batch["caption_id"], soft_targets=True)
    return loss, {k: v for k, v in stats.items() if k != "loss"}

  return fn
