"""Writes `clip_tiny/` and `clip_tiny_torch.npz`: a tiny random HF CLIP and its outputs.

Needs torch, transformers and regex only (no JAX), so it runs in a torch-only venv:

  python tests/data/make_clip_reference.py tests/data

`tests/test_clip_model.py` loads `clip_tiny/` with `clip.load_hf_clip` and
`clip.hf_clip_tokenizer` and checks them against the `.npz` (no torch needed).

`clip_tiny/`:

* `config.json`, `model.safetensors`: a seeded random `transformers.CLIPModel`
  (`TEXT`, `VISION`: width 32, 2 layers, 2 heads, MLP 37 / 41, layer_norm_eps 1e-3,
  quick_gelu; images 16x16, patches 4; projection_dim 16; logit_scale 2.0). Every
  weight is re-drawn (Linear weights N(0, 1/fan_in), embeddings and the class
  embedding N(0, 1), LayerNorm weights 1 + N(0, 0.2^2), biases N(0, 0.2^2)) so that
  attention is far from uniform and a wrong mapping, epsilon, activation or pooling
  position shows in the outputs.
* `tokenizer.json` (+ `tokenizer_config.json`): transformers' `CLIPTokenizer` built
  from a vocabulary in OpenAI CLIP's layout (the 256 byte symbols, the same with
  `</w>`, then the merged symbols, then <|startoftext|> and <|endoftext|>) and
  `NUM_MERGES` BPE merges learned here from `CORPUS`, by OpenAI's algorithm.

The `.npz` holds (float32, torch CPU eager attention):

* `sentences`, and HF's tokenization `ids`, `mask` `[10, MAX_LEN]` (padding is
  <|endoftext|>, as the OpenAI checkpoints) and `ids_short`, `mask_short`
  `[10, SHORT_LEN]` with truncation, `num_truncated*`; checked here against an
  independent pure-Python BPE (`bpe_ids`); `decoded`: HF's decoding of `ids`;
* `pixels` `[4, 16, 16, 3]` (NHWC; torch got NCHW), `image_embeds` `[4, 16]`
  (`get_image_features`), `text_embeds` `[10, 16]` (`get_text_features`), `hidden`
  `[10, MAX_LEN, 32]` (text `last_hidden_state`), `logits_per_image` `[4, 10]`;
* `hand_ids`, `hand_mask` `[4, MAX_LEN]`: rows of different lengths padded with ids
  other than <|endoftext|> (HF pools at the first <|endoftext|>), `hand_hidden`,
  `hand_text_embeds`;
* `*_gelu`: `image_embeds`, `text_embeds`, `hidden` of the same weights with
  `hidden_act="gelu"` in both towers.
"""
import collections
import json
import pathlib
import sys
import unicodedata

import numpy as np

SEED = 0
MAX_LEN, SHORT_LEN = 16, 7
NUM_MERGES = 48
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# HF's CLIP pre-tokenizer pattern (OpenAI's, with the special tokens first).
PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
           r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
CORPUS = ("a red circle on the left. a blue square on the right. a green triangle above "
          "a yellow star. two red circles and a small blue square. the big green star "
          "is below the red triangle. shapes: circles, squares, triangles and stars.")
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu",
              layer_norm_eps=1e-3, projection_dim=16, attention_dropout=0.0)
TEXT = dict(COMMON, intermediate_size=37, max_position_embeddings=24)
VISION = dict(COMMON, intermediate_size=41, image_size=16, patch_size=4, num_channels=3)
SENTENCES = [
    "a red circle",
    "A Blue SQUARE on the left.",                # lower-casing, "." split off
    "two green triangles, one small",
    "the big yellow star's shadow",              # 's split off
    "café ☕ naïve",                              # multi-byte: byte-level symbols
    "",                                          # <|startoftext|> <|endoftext|> only
    "   spaced\tout\n words  ",                  # whitespace collapsed
    "shapes: 3 circles & 12 squares!",           # digits one by one
    "a red circle and a blue square and a green triangle above a yellow star",  # cut
    "it's a triangle, isn't it?",
]


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's byte -> printable unicode symbol map."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def words(text: str) -> list[str]:
  """HF CLIP's normalizer (NFC, whitespace runs -> " ", lower case) and pre-tokenizer."""
  import regex  # pylint: disable=g-import-not-at-top
  byte_map = bytes_to_unicode()
  text = unicodedata.normalize("NFC", text)
  text = regex.sub(r"\s+", " ", text).lower()
  return ["".join(byte_map[b] for b in w.encode("utf-8")) for w in regex.findall(PATTERN, text)]


def train_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
  """OpenAI-style BPE training: repeatedly merge the most frequent adjacent pair."""
  vocab = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words(corpus))
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in vocab.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))  # ties: the smaller pair, stable
    merges.append(best)
    merged = collections.Counter()
    for word, count in vocab.items():
      out, i = [], 0
      while i < len(word):
        if word[i:i + 2] == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    vocab = merged
  return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
  """OpenAI CLIP's vocabulary layout, specials last (49406, 49407 in the real one)."""
  base = list(bytes_to_unicode().values())
  tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + list(SPECIALS)
  return {t: i for i, t in enumerate(tokens)}


def bpe_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
  """Independent CLIP BPE (OpenAI's `simple_tokenizer.bpe`): ids with the specials."""
  ranks = {m: i for i, m in enumerate(merges)}
  ids = [vocab[SPECIALS[0]]]
  for w in words(text):
    word = tuple(w[:-1]) + (w[-1] + "</w>",)
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
      if pair not in ranks:
        break
      out, i = [], 0
      while i < len(word):
        if word[i:i + 2] == pair:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      word = tuple(out)
    ids += [vocab[t] for t in word]
  return ids + [vocab[SPECIALS[1]]]


def tokenize(out_dir: pathlib.Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
  """Writes the tokenizer files; the vocabulary and HF's ids of SENTENCES."""
  import transformers  # pylint: disable=g-import-not-at-top
  merges = train_merges(CORPUS, NUM_MERGES)
  vocab = build_vocab(merges)
  built = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  built.save_pretrained(out_dir)
  for extra in ("vocab.json", "merges.txt", "special_tokens_map.json"):
    (out_dir / extra).unlink(missing_ok=True)  # tokenizer.json holds them all
  loaded = transformers.CLIPTokenizer.from_pretrained(out_dir)
  out = {"sentences": np.array(SENTENCES)}
  full = [bpe_ids(s, vocab, merges) for s in SENTENCES]
  for suffix, length in (("", MAX_LEN), ("_short", SHORT_LEN)):
    results = [tok(SENTENCES, padding="max_length", max_length=length, truncation=True,
                   return_tensors="np") for tok in (built, loaded)]
    np.testing.assert_array_equal(results[1]["input_ids"], results[0]["input_ids"])
    ids, mask = results[0]["input_ids"], results[0]["attention_mask"].astype(bool)
    for row, m, ref in zip(ids, mask, full):  # HF truncation keeps <|endoftext|>
      want = ref if len(ref) <= length else ref[:length - 1] + ref[-1:]
      assert row[m].tolist() == want, (row[m].tolist(), want)
      assert (row[~m] == vocab[SPECIALS[1]]).all()
    out[f"ids{suffix}"] = ids.astype(np.int32)
    out[f"mask{suffix}"] = mask
    out[f"num_truncated{suffix}"] = np.int32(sum(len(r) > length for r in full))
  out["decoded"] = np.array(loaded.batch_decode(out["ids"], skip_special_tokens=True))
  return vocab, out


def torch_reference(vocab_size: int, eos_id: int, act: str = "quick_gelu", seed: int = SEED):
  """A seeded random `CLIPModel` with every weight re-drawn (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  text = dict(TEXT, hidden_act=act, vocab_size=vocab_size, bos_token_id=eos_id - 1,
              eos_token_id=eos_id, pad_token_id=eos_id)
  config = transformers.CLIPConfig(text_config=text, vision_config=dict(VISION, hidden_act=act),
                                   projection_dim=16, logit_scale_init_value=2.0)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, t in model.named_parameters():
      if name == "logit_scale":
        continue
      if "layer_norm" in name or "layrnorm" in name:
        t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(t))
      elif name.endswith(".bias"):
        t.copy_(0.2 * torch.randn_like(t))
      elif any(k in name for k in ("token_", "position_", "class_")):
        t.copy_(torch.randn_like(t))  # embeddings
      else:  # Linear and patch conv weights: fan_in = prod(shape[1:])
        t.copy_(torch.randn_like(t) / np.sqrt(np.prod(t.shape[1:])))
  return model


def hand_rows(vocab: dict[str, int], seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """Rows `[bos, words..., eos, pad...]` of lengths 3..MAX_LEN padded with non-eos ids."""
  rng = np.random.default_rng(seed)
  bos, eos = vocab[SPECIALS[0]], vocab[SPECIALS[1]]
  ids = rng.integers(0, bos, (4, MAX_LEN)).astype(np.int32)  # padding: any word id
  mask = np.zeros((4, MAX_LEN), bool)
  for row, length in enumerate((3, 9, MAX_LEN, 5)):
    ids[row, 0], ids[row, length - 1] = bos, eos
    mask[row, :length] = True
  ids[3, 5:] = 0  # a constant pad id too
  return ids, mask


def outputs(model, pixels, ids, mask) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  pixels = torch.tensor(pixels).permute(0, 3, 1, 2)  # NHWC -> NCHW
  with torch.no_grad():
    text = model.text_model(input_ids=ids, attention_mask=mask)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
    text_embeds = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
  f32 = lambda t: t.numpy().astype(np.float32)
  return dict(image_embeds=f32(image_embeds), text_embeds=f32(text_embeds),
              hidden=f32(text.last_hidden_state), logits_per_image=f32(out.logits_per_image))


def main(data_dir: str) -> None:
  data_dir = pathlib.Path(data_dir)
  model_dir = data_dir / "clip_tiny"
  model_dir.mkdir(parents=True, exist_ok=True)
  vocab, arrays = tokenize(model_dir)
  eos = vocab[SPECIALS[1]]
  model = torch_reference(len(vocab), eos)
  model.save_pretrained(model_dir, safe_serialization=True)
  for path in model_dir.iterdir():
    path.chmod(0o644)
  config = json.loads((model_dir / "config.json").read_text())
  assert config["text_config"]["layer_norm_eps"] == 1e-3, config
  pixels = np.random.default_rng(SEED + 1).standard_normal(
      (4, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32)
  arrays.update(pixels=pixels, logit_scale=np.float32(model.logit_scale.item()),
                **outputs(model, pixels, arrays["ids"], arrays["mask"]))
  hand_ids, hand_mask = hand_rows(vocab)
  hand = outputs(model, pixels, hand_ids, hand_mask)
  arrays.update(hand_ids=hand_ids, hand_mask=hand_mask, hand_hidden=hand["hidden"],
                hand_text_embeds=hand["text_embeds"])
  gelu = torch_reference(len(vocab), eos, act="gelu")
  gelu.load_state_dict(model.state_dict())
  out = outputs(gelu, pixels, arrays["ids"], arrays["mask"])
  arrays.update({f"{k}_gelu": out[k] for k in ("image_embeds", "text_embeds", "hidden")})
  np.savez_compressed(data_dir / "clip_tiny_torch.npz", **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
