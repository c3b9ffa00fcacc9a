"""Writes `t5_tiny_torch.npz`: tiny random HF T5 encoders and their PyTorch outputs.

Needs torch and transformers only (no JAX), so it runs in a torch-only venv:

  python tests/data/make_t5_reference.py tests/data/t5_tiny_torch.npz

`tests/test_t5.py` checks the Flax `T5Encoder` against the file (always) and, where
torch and transformers are installed next to JAX, against `torch_reference` live.
For each `feed_forward_proj` P the file holds `P/<HF tensor name>` (the state dict of
a `T5EncoderModel`), `P/ids`, `P/mask` and `P/hidden` (`last_hidden_state`), plus
`buckets`: HF's bidirectional relative position buckets (32 buckets, max distance
128) of the relative positions `-300 ... 300`.
"""
import sys

import numpy as np

FEED_FORWARD = ("relu", "gated-gelu")
# d_kv * num_heads = 12 != d_model: the attention's inner width is its own.
CONFIG = dict(vocab_size=40, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              layer_norm_epsilon=1e-6, dropout_rate=0.0)
LENGTHS = (11, 7, 3)  # real tokens per row; the rest of the 11 is padding
BUCKET_RANGE = 300


def torch_reference(feed_forward_proj: str, seed: int = 0) -> dict[str, np.ndarray]:
  """A seeded random `T5EncoderModel` -> its float32 state dict, inputs and outputs.

  Layer-norm weights and the relative attention bias are re-drawn away from their
  init (ones, small) so that a wrong mapping of either shows in the outputs.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.T5Config(**CONFIG, feed_forward_proj=feed_forward_proj)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "layer_norm" in name:
        tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
      elif "relative_attention_bias" in name:
        tensor.copy_(torch.randn_like(tensor))
  rng = np.random.default_rng(seed)
  length = max(LENGTHS)
  ids = rng.integers(3, CONFIG["vocab_size"], (len(LENGTHS), length)).astype(np.int32)
  mask = np.arange(length)[None] < np.array(LENGTHS)[:, None]
  ids = np.where(mask, ids, 0).astype(np.int32)  # <pad> = 0
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
  out = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  out.update(ids=ids, mask=mask, hidden=hidden.numpy().astype(np.float32))
  return out


def torch_buckets() -> np.ndarray:
  """HF `T5Attention._relative_position_bucket` (bidirectional, 32, 128) of -300..300."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top
  positions = torch.arange(-BUCKET_RANGE, BUCKET_RANGE + 1)
  buckets = modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      positions, bidirectional=True, num_buckets=32, max_distance=128)
  return buckets.numpy().astype(np.int8)


def main(path: str) -> None:
  arrays = {"buckets": torch_buckets()}
  for proj in FEED_FORWARD:
    # encoder.embed_tokens.weight is the same tensor as shared.weight: keep one.
    ref = {k: v for k, v in torch_reference(proj).items() if k != "encoder.embed_tokens.weight"}
    arrays.update({f"{proj}/{k}": v for k, v in ref.items()})
  np.savez_compressed(path, **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
