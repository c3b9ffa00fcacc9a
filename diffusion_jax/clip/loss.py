"""CLIP's symmetric contrastive (InfoNCE) loss, with care for repeated captions.

Row `i` of a batch is a matching (image, caption) pair. The logits are the scaled
cosine similarities of every image with every caption; the loss is the mean of the
image->text and the text->image cross-entropies whose targets are the diagonal.

A batch may hold the same caption more than once (the shapes data set repeats
captions). By default the loss treats the other copies as negatives, as CLIP does;
`soft_targets=True` spreads each target uniformly over the rows with the same
caption instead. The accuracy metrics always count any copy as correct (with
identical text embeddings, argmax would pick the first copy for every image).

Note: when the copies have identical text embeddings (a deterministic text encoder
on identical token ids), both choices give the same loss and gradients: a copy's
logit equals the target's, and the group's diagonal targets sum to its uniform
ones. Copies only lower the attainable minimum (log k for a caption seen k times).
`soft_targets` differs once copies are embedded differently (dropout, augmentation).
"""
from typing import Any

import jax
import jax.numpy as jnp

# CLIP clips the logit scale so that logits are scaled by at most 100 (OpenAI CLIP
# clamps the parameter at log(100) after each step; here the scale is clamped in the
# loss, so the gradient w.r.t. logit_scale is zero above it).
MAX_SCALE = 100.0


def same_caption(text_ids: jax.Array) -> jax.Array:
  """`[B]` caption ids or `[B, L]` token ids -> `[B, B]` bool, True where rows are equal.

  Token ids of the same caption padded to the same length are equal rows.
  """
  flat = jnp.reshape(text_ids, (text_ids.shape[0], -1))
  return jnp.all(flat[:, None, :] == flat[None, :, :], axis=-1)


def _normalize(x: jax.Array) -> jax.Array:
  # torch's F.normalize floor, so an all-zero embedding gives zeros rather than NaN.
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over rows of `-sum(targets * log_softmax(logits))`; `[B, B]` each."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _rows_sum_to_one(x: jax.Array) -> jax.Array:
  return x / jnp.sum(x, axis=-1, keepdims=True)  # each row has its diagonal 1


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *,
                     text_ids: jax.Array | None = None, same: jax.Array | None = None,
                     soft_targets: bool = False) -> tuple[jax.Array, dict[str, Any]]:
  """CLIP's symmetric InfoNCE loss of a batch of matching pairs.

  Args:
    image_emb: `[B, E]` image embeddings (any norm; L2-normalised here).
    text_emb: `[B, E]` text embeddings of the captions of those images, in order.
    logit_scale: scalar; logits are `min(exp(logit_scale), 100) * cos`.
    text_ids: `[B]` caption ids or `[B, L]` token ids: equal rows are the same
      caption (see `same_caption`). At most one of `text_ids` and `same`.
    same: `[B, B]` bool, True where captions `i` and `j` are the same. The diagonal
      is taken as True whatever it holds. None (and no `text_ids`): all distinct.
    soft_targets: targets spread uniformly over the captions (images) equal to the
      matching one; False: the diagonal only, other copies count as negatives (CLIP).

  Returns:
    `(loss, metrics)`: the scalar float32 loss and a dict of scalars: "loss",
    "i2t_accuracy" (share of images whose most similar caption in the batch is
    theirs or a copy of it), "t2i_accuracy" (the same for captions), "scale" (the
    clamped `exp(logit_scale)`).
  """
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError("image_emb and text_emb must both be [B, E]; got "
                     f"{image_emb.shape} and {text_emb.shape}")
  if text_ids is not None and same is not None:
    raise ValueError("give text_ids or same, not both")
  b = image_emb.shape[0]
  eye = jnp.eye(b, dtype=bool)
  if text_ids is not None:
    same = same_caption(text_ids)
  if same is not None and jnp.shape(same) != (b, b):
    raise ValueError(f"same must be [{b}, {b}]; got {jnp.shape(same)}")
  same = eye if same is None else jnp.asarray(same, bool) | eye
  scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), MAX_SCALE)
  logits = scale * _normalize(image_emb) @ _normalize(text_emb).T  # [image, text]
  targets = (same if soft_targets else eye).astype(jnp.float32)
  loss = 0.5 * (_cross_entropy(logits, _rows_sum_to_one(targets))
                + _cross_entropy(logits.T, _rows_sum_to_one(targets.T)))
  rows = jnp.arange(b)
  i2t = jnp.mean(same[rows, jnp.argmax(logits, axis=1)].astype(jnp.float32))
  t2i = jnp.mean(same[jnp.argmax(logits, axis=0), rows].astype(jnp.float32))
  return loss, {"loss": loss, "i2t_accuracy": i2t, "t2i_accuracy": t2i, "scale": scale}
