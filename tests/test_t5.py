"""Tests of diffusion_jax.text.t5: the Flax T5 encoder, its loader and tokenizer.

The encoder is checked against an independent float64 numpy T5 written here from
HF tensor names and the T5 / HF semantics (always runs), against outputs of HF
`T5EncoderModel` recorded in `tests/data/t5_tiny_torch.npz` (always runs; written by
`tests/data/make_t5_reference.py` in a torch-only venv), and against that model
live where torch and transformers are installed next to JAX.
"""
import functools
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import text
from diffusion_jax.text import t5

DATA = pathlib.Path(__file__).parent / "data"
FEED_FORWARD = ("relu", "gated-gelu")
# HF config.json fields of the tiny models (the recorded file's too).
HF_CONFIG = dict(model_type="t5", vocab_size=40, d_model=16, d_kv=6, d_ff=24, num_layers=2,
                 num_heads=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, layer_norm_epsilon=1e-6)
# float32 Flax vs the float64 numpy reference, |tokens| <= 3.1: measured max 2.0e-6
# ("relu") and 4.8e-6 ("gated-gelu") on the tokens.
NUMPY_ATOL = 2e-5
# Measured max |Flax - torch| on the recorded tokens (torch 2.13.0 CPU, transformers
# 5.24.0, |h| <= 4.1): 1.6e-6 for "relu", 1.1e-6 for "gated-gelu"; live (seed 1, run
# once with the torch venv's site-packages appended to sys.path): 1.2e-6 and 1.3e-6.
TORCH_ATOL = 2e-5
BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _reference_script():
  """tests/data/make_t5_reference.py as a module (imports only numpy at load)."""
  spec = importlib.util.spec_from_file_location("make_t5_reference",
                                                DATA / "make_t5_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(feed_forward_proj, **overrides):
  fields = {k: v for k, v in HF_CONFIG.items() if k != "model_type"}
  return t5.T5Config(**{**fields, "feed_forward_proj": feed_forward_proj, **overrides})


def _hf_shapes(cfg):
  """HF encoder tensor name -> shape, written out from the HF T5 module tree."""
  inner, d = cfg.num_heads * cfg.d_kv, cfg.d_model
  gated = cfg.feed_forward_proj.startswith("gated")
  shapes = {"shared.weight": (cfg.vocab_size, d), "encoder.final_layer_norm.weight": (d,),
            BIAS: (cfg.relative_attention_num_buckets, cfg.num_heads)}
  for i in range(cfg.num_layers):
    p = f"encoder.block.{i}.layer."
    shapes.update({p + f"0.SelfAttention.{n}.weight": (inner, d) for n in "qkv"})
    shapes[p + "0.SelfAttention.o.weight"] = (d, inner)
    shapes[p + "0.layer_norm.weight"] = shapes[p + "1.layer_norm.weight"] = (d,)
    for n in ("wi_0", "wi_1") if gated else ("wi",):
      shapes[p + f"1.DenseReluDense.{n}.weight"] = (cfg.d_ff, d)
    shapes[p + "1.DenseReluDense.wo.weight"] = (d, cfg.d_ff)
  return shapes


def _random_state(cfg, seed=0):
  """Random float32 HF-named tensors; norms near 1, a large position bias."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in _hf_shapes(cfg).items():
    if "layer_norm" in name:
      state[name] = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      state[name] = (1.0 if name == BIAS else 0.3) * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in state.items()}


def _batch(lengths=(11, 7, 3), vocab=40, seed=0):
  rng = np.random.default_rng(seed)
  length = max(lengths)
  mask = np.arange(length)[None] < np.array(lengths)[:, None]
  return np.where(mask, rng.integers(3, vocab, (len(lengths), length)), 0).astype(np.int32), mask


# ---------------------------------------------------------------------------
# Independent float64 numpy T5 encoder.


def _np_bucket(rel, num_buckets, max_distance):
  """HF's bidirectional bucket of one relative position (key - query), in float64."""
  half = num_buckets // 2
  exact = half // 2
  offset, n = (half if rel > 0 else 0), abs(rel)
  if n < exact:
    return offset + n
  log_bucket = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
  return offset + min(half - 1, log_bucket)


def _np_t5(w, ids, mask, hf):
  """HF T5EncoderModel.last_hidden_state and its masked mean, in float64."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  heads, d_kv, eps = hf["num_heads"], hf["d_kv"], hf["layer_norm_epsilon"]
  b, length = ids.shape
  norm = lambda x, name: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w[name]
  lin = lambda x, name: x @ w[name].T
  gelu_new = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  table = w[BIAS]
  bias = np.array([[table[_np_bucket(k - q, hf["relative_attention_num_buckets"],
                                     hf["relative_attention_max_distance"])]
                    for k in range(length)] for q in range(length)])  # [q, k, H]
  bias = bias.transpose(2, 0, 1)[None] + np.where(mask, 0.0, -np.inf)[:, None, None, :]
  x = w["shared.weight"][ids]
  for i in range(hf["num_layers"]):
    p = f"encoder.block.{i}.layer."
    h = norm(x, p + "0.layer_norm.weight")
    split = lambda t: t.reshape(b, length, heads, d_kv).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(h, p + f"0.SelfAttention.{n}.weight")) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) + bias  # no 1/sqrt(d_kv) in T5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, heads * d_kv)
    x = x + lin(ctx, p + "0.SelfAttention.o.weight")
    h, ff = norm(x, p + "1.layer_norm.weight"), p + "1.DenseReluDense."
    if hf["feed_forward_proj"] == "gated-gelu":
      h = gelu_new(lin(h, ff + "wi_0.weight")) * lin(h, ff + "wi_1.weight")
    else:
      h = np.maximum(lin(h, ff + "wi.weight"), 0.0)
    x = x + lin(h, ff + "wo.weight")
  x = norm(x, "encoder.final_layer_norm.weight")
  return x, (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def _assert_real_close(tokens, ref, mask, atol):
  real = mask[..., None]
  np.testing.assert_allclose(np.where(real, tokens, 0), np.where(real, ref, 0), atol=atol, rtol=0)


# ---------------------------------------------------------------------------
# Relative position buckets.


def test_bucket_hand_table():
  # HF bidirectional, 32 buckets, max distance 128: 16 per direction (keys after the
  # query get +16), 8 exact, then 8 + int(log(n / 8) / log(16) * 8), capped at 15.
  # 20: log(2.5) / log(16) * 8 = 2.64 -> 10; 12: log(1.5) / log(16) * 8 = 1.17 -> 9;
  # 90: 6.98 -> 14; 91: 7.02 -> 15; 200: 9.29 -> 17, capped at 15.
  table = {0: 0, 1: 17, -1: 1, 7: 23, -7: 7, 8: 24, -8: 8, 12: 25, 20: 26, -20: 10,
           90: 30, 91: 31, -91: 15, 127: 31, 200: 31, -200: 15}
  got = t5.relative_position_bucket(np.array(list(table)), num_buckets=32, max_distance=128)
  assert got.tolist() == list(table.values())
  grid = t5.relative_position_bucket(np.arange(4)[None] - np.arange(4)[:, None], 8, 16)
  assert grid.shape == (4, 4) and grid.dtype == np.int32
  assert grid[0].tolist() == [0, 5, 6, 6] and grid[:, 0].tolist() == [0, 1, 2, 2]


def test_bucket_matches_recorded_hf():
  recorded = np.load(DATA / "t5_tiny_torch.npz")["buckets"]
  positions = np.arange(len(recorded)) - len(recorded) // 2  # -300 ... 300
  np.testing.assert_array_equal(t5.relative_position_bucket(positions), recorded)
  # The float64 reference used below agrees too (no bucket edge falls between them).
  assert [_np_bucket(int(r), 32, 128) for r in positions] == recorded.tolist()


# ---------------------------------------------------------------------------
# Forward pass against references.


@pytest.mark.parametrize("proj", FEED_FORWARD)
def test_matches_float64_numpy(proj):
  cfg = _config(proj)
  module = t5.T5Encoder(cfg)
  state = _random_state(cfg)
  params = t5.params_from_state_dict(module, state)
  ids, mask = _batch()
  tokens, pooled = jax.jit(module.apply)({"params": params}, ids, mask)
  ref_tokens, ref_pooled = _np_t5(state, ids, mask, {**HF_CONFIG, "feed_forward_proj": proj})
  assert tokens.shape == (3, 11, 16) and pooled.shape == (3, 16)
  _assert_real_close(np.asarray(tokens), ref_tokens, mask, NUMPY_ATOL)
  np.testing.assert_allclose(pooled, ref_pooled, atol=NUMPY_ATOL, rtol=0)


def _recorded(proj):
  data = np.load(DATA / "t5_tiny_torch.npz")
  ref = {k[len(proj) + 1:]: data[k] for k in data.files if k.startswith(proj + "/")}
  return ref.pop("ids"), ref.pop("mask"), ref.pop("hidden"), ref


@pytest.mark.parametrize("proj", FEED_FORWARD)
def test_matches_recorded_torch_outputs(proj):
  recorded_config = {**_reference_script().CONFIG, "model_type": "t5"}
  assert recorded_config.pop("dropout_rate") == 0 and recorded_config == HF_CONFIG
  ids, mask, hidden, state = _recorded(proj)
  module = t5.T5Encoder(_config(proj))
  tokens, pooled = jax.jit(module.apply)({"params": t5.params_from_state_dict(module, state)},
                                         ids, mask)
  _assert_real_close(np.asarray(tokens), hidden, mask, TORCH_ATOL)
  np.testing.assert_allclose(pooled, (hidden * mask[..., None]).sum(1) / mask.sum(1)[:, None],
                             atol=TORCH_ATOL, rtol=0)
  # The numpy reference agrees with torch as well.
  ref, _ = _np_t5(state, ids, mask, {**HF_CONFIG, "feed_forward_proj": proj})
  _assert_real_close(ref, hidden, mask, TORCH_ATOL)


@pytest.mark.parametrize("proj", FEED_FORWARD)
def test_matches_torch_reference(proj, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  save_file = pytest.importorskip("safetensors.numpy").save_file
  ref = _reference_script().torch_reference(proj, seed=1)  # not the recorded seed
  ids, mask, hidden = ref.pop("ids"), ref.pop("mask"), ref.pop("hidden")
  assert "encoder.embed_tokens.weight" in ref and "shared.weight" in ref
  save_file(ref, tmp_path / "model.safetensors")
  module = t5.T5Encoder(_config(proj))
  params = t5.params_from_state_dict(module, t5.read_encoder_tensors(tmp_path))
  tokens, _ = jax.jit(module.apply)({"params": params}, ids, mask)
  _assert_real_close(np.asarray(tokens), hidden, mask, TORCH_ATOL)


def test_padding_ids_do_not_change_real_outputs():
  module = t5.T5Encoder(_config("gated-gelu"))
  params = t5.params_from_state_dict(module, _random_state(module.config, seed=3))
  ids, mask = _batch()
  apply = jax.jit(module.apply)
  tokens, pooled = apply({"params": params}, ids, mask)
  noise = np.random.default_rng(1).integers(3, 40, ids.shape).astype(np.int32)
  tokens2, pooled2 = apply({"params": params}, np.where(mask, ids, noise), mask)
  _assert_real_close(np.asarray(tokens2), np.asarray(tokens), mask, 1e-6)
  np.testing.assert_allclose(pooled2, pooled, atol=1e-6, rtol=0)
  assert not np.allclose(np.asarray(tokens2)[~mask], np.asarray(tokens)[~mask])


# ---------------------------------------------------------------------------
# Loader.


@functools.lru_cache(maxsize=None)
def _init_params(cfg):
  """The module of `cfg` and its init params (jax arrays: safe to share)."""
  module = t5.T5Encoder(cfg)
  ids = np.zeros((1, 4), np.int32)
  return module, jax.jit(module.init)(jax.random.PRNGKey(0), ids, ids == 0)["params"]


@pytest.mark.parametrize("proj", FEED_FORWARD)
def test_state_dict_round_trip_ignores_decoder(proj):
  module, params = _init_params(_config(proj))
  assert t5.init_shapes(module) == _hf_shapes(module.config)
  state = t5.to_state_dict(params)
  assert set(state) == set(_hf_shapes(module.config))
  # A whole T5ForConditionalGeneration: decoder, LM head and the embedding's alias.
  state.update({"decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((12, 16)),
                "decoder.final_layer_norm.weight": np.zeros(16), "lm_head.weight": np.zeros(3),
                "encoder.embed_tokens.weight": state["shared.weight"]})
  jax.tree.map(np.testing.assert_array_equal, t5.params_from_state_dict(module, state), params)
  # Only the alias name: used as the shared embedding.
  state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
  jax.tree.map(np.testing.assert_array_equal, t5.params_from_state_dict(module, state), params)


def test_bfloat16_checkpoint(tmp_path):
  save_file = pytest.importorskip("safetensors.numpy").save_file
  ml_dtypes = pytest.importorskip("ml_dtypes")
  module, params = _init_params(_config("relu"))
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in t5.to_state_dict(params).items()}
  save_file(state, tmp_path / "model.safetensors")
  loaded = t5.params_from_state_dict(module, t5.read_encoder_tensors(tmp_path))
  assert jax.tree.leaves(loaded)[0].dtype == np.float32
  rounded = t5.params_from_state_dict(module, {k: v.astype(np.float32) for k, v in state.items()})
  jax.tree.map(np.testing.assert_array_equal, loaded, rounded)


def test_shape_mismatch_names_tensor():
  module, params = _init_params(_config("relu"))
  state = t5.to_state_dict(params)
  state["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((16, 32), np.float32)
  with pytest.raises(ValueError) as err:
    t5.params_from_state_dict(module, state, source="ckpt")
  msg = str(err.value)
  assert "checkpoint ckpt does not match" in msg and "tensors of another shape (1)" in msg
  assert ("encoder.block.1.layer.1.DenseReluDense.wo.weight: expected [16, 24] "
          "(T5Config d_ff, d_model), found [16, 32]") in msg
  assert "Fix: build the module from the config.json" in msg


def test_missing_and_unused_tensors_are_named():
  module, params = _init_params(_config("relu"))
  state = t5.to_state_dict(params)
  state.pop("encoder.final_layer_norm.weight")
  with pytest.raises(ValueError, match=r"missing tensors \(1\): \['encoder\.final_layer_norm"):
    t5.params_from_state_dict(module, state)
  # A relu checkpoint into a gated-gelu module: wi is unused, wi_0 / wi_1 missing.
  gated = t5.T5Encoder(_config("gated-gelu"))
  with pytest.raises(ValueError, match=r"(?s)missing tensors \(5\).*wi_0.*unused tensors "
                     r"\(2\).*DenseReluDense\.wi\.weight.*feed_forward_proj"):
    t5.params_from_state_dict(gated, state)


def test_config_from_hf_json(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"model_type": "t5", "d_model": 32, "dropout_rate": 0.1}))
  assert t5.T5Config.from_hf_json(path) == t5.T5Config(d_model=32)  # HF defaults elsewhere
  assert t5.T5Config(d_model=32).hidden_size == 32
  for bad, match in [({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
                     ({"model_type": "umt5"}, "'umt5' is not supported.*every layer"),
                     ({"model_type": "bert"}, "'bert' is not supported: not a T5 model")]:
    path.write_text(json.dumps({**HF_CONFIG, **bad}))
    with pytest.raises(ValueError, match=match):
      t5.T5Config.from_hf_json(path)


def test_is_t5_checkpoint(tmp_path):
  assert not t5.is_t5_checkpoint(tmp_path)  # no config.json
  for model_type, expected in [("t5", True), ("mt5", True), ("bert", False)]:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert t5.is_t5_checkpoint(tmp_path) is expected
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "umt5"}))
  with pytest.raises(ValueError, match="umt5"):
    t5.is_t5_checkpoint(tmp_path)


# ---------------------------------------------------------------------------
# Tokenizer and end-to-end loading.

WORDS = ["a", "photo", "of", "cat", "red", "car", "dog", "the", "on", "mat"]


def _write_tokenizer(path, post_processor=True):
  """A tiny T5-like Unigram tokenizer.json: <pad> 0, </s> 1, <unk> 2; 40 ids."""
  tokenizers = pytest.importorskip("tokenizers")
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
  vocab += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(WORDS)]
  vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  if post_processor:
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  tok.save(str(path))
  return path


def test_tokenizer_appends_eos_and_pads_with_zero(tmp_path):
  for post_processor in (True, False):  # without one, </s> is appended as HF does
    tok = t5.T5Tokenizer(_write_tokenizer(tmp_path / "tokenizer.json", post_processor))
    ids, mask = tok.encode(["a red car", "the cat on the mat"], 6)
    assert tok.pad_id == 0 and tok.eos_id == 1 and tok.vocab_size == 40
    np.testing.assert_array_equal(ids[0], [WORDS.index(w) + 4 for w in ("a", "red", "car")]
                                  + [1, 0, 0])
    np.testing.assert_array_equal(mask.sum(1), [4, 6])
    assert ids[1, -1] == 1  # truncated to 6, </s> kept
    assert tok.decode(ids) == ["a red car", "the cat on the mat"]
  with pytest.raises(ValueError, match="not a T5 tokenizer"):
    t5.T5Tokenizer(tmp_path / "tokenizer.json", pad_token="</s>")


def _write_checkpoint(path, proj="gated-gelu", shards=False):
  """config.json + safetensors (+ decoder junk) + tokenizer.json; returns the state."""
  save_file = pytest.importorskip("safetensors.numpy").save_file
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps({**HF_CONFIG, "feed_forward_proj": proj}))
  state = _random_state(_config(proj))
  full = {**state, "decoder.final_layer_norm.weight": np.ones(16, np.float32),
          "lm_head.weight": np.ones((40, 16), np.float32)}
  if shards:
    names = sorted(full)
    parts = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    for file, keys in parts.items():
      save_file({k: full[k] for k in keys}, path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in parts.items() for k in keys}}))
  else:
    save_file(full, path / "model.safetensors")
  _write_tokenizer(path / "tokenizer.json")
  return state


@pytest.mark.parametrize("shards", [False, True])
def test_pretrained_end_to_end(tmp_path, shards):
  state = _write_checkpoint(tmp_path, shards=shards)
  loaded = t5.read_encoder_tensors(tmp_path)
  assert set(loaded) == set(state)  # decoder and LM head not read
  encoder = text.FrozenTextEncoder.pretrained(str(tmp_path), max_length=8)
  assert isinstance(encoder.module, t5.T5Encoder) and not encoder.module.normalize
  assert isinstance(encoder.tokenizer, t5.T5Tokenizer)
  out = encoder(["a photo of a cat", "a red car", ""])
  assert out.tokens.shape == (3, 8, 16) and out.pooled.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(out.mask).sum(1), [6, 4, 1])  # "" -> </s>
  ids, mask = encoder.tokenizer.encode(["a photo of a cat", "a red car", ""], 8)
  ref_tokens, ref_pooled = _np_t5(state, ids, mask,
                                  {**HF_CONFIG, "feed_forward_proj": "gated-gelu"})
  _assert_real_close(np.asarray(out.tokens), ref_tokens, mask, NUMPY_ATOL)
  np.testing.assert_allclose(out.pooled, ref_pooled, atol=NUMPY_ATOL, rtol=0)


def test_conditioner_builds_t5_from_config(tmp_path):
  pytest.importorskip("ml_collections")
  from configs import shapes_text_frozen  # pylint: disable=g-import-not-at-top
  from diffusion_jax.text import conditioner  # pylint: disable=g-import-not-at-top
  _write_checkpoint(tmp_path, proj="relu")
  config = shapes_text_frozen.get_config()
  config.conditioning.frozen_encoder_path = str(tmp_path)
  config.conditioning.text_max_length = 8
  config.model.cross_attn_dim = config.model.cond_vector_dim = 16
  out = conditioner.TextConditioner(config)(["a red car", "a cat"])
  assert out["tokens"].shape == (2, 8, 16) and out["vector"].shape == (2, 16)
  np.testing.assert_array_equal(out["mask"].sum(1), [4, 3])
  config.model.cross_attn_dim = 384
  with pytest.raises(ValueError, match="gives 16-wide embeddings"):
    conditioner.TextConditioner(config)


def test_bfloat16_encoder_from_config(tmp_path):
  """conditioning.frozen_encoder_dtype reaches a T5's params and compute."""
  pytest.importorskip("ml_collections")
  from configs import shapes_text_frozen  # pylint: disable=g-import-not-at-top
  from diffusion_jax.text import conditioner  # pylint: disable=g-import-not-at-top
  state = _write_checkpoint(tmp_path, proj="relu")
  config = shapes_text_frozen.get_config()
  config.conditioning.frozen_encoder_path = str(tmp_path)
  config.conditioning.frozen_encoder_dtype = "bfloat16"
  config.conditioning.text_max_length = 8
  config.model.cross_attn_dim = config.model.cond_vector_dim = 16
  cond = conditioner.TextConditioner(config)
  leaves = jax.tree.leaves(cond._encoder.params)  # pylint: disable=protected-access
  assert {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}
  out = cond(["a red car", "a cat"])
  ids, mask = cond._encoder.tokenizer.encode(["a red car", "a cat"], 8)  # pylint: disable=protected-access
  ref, _ = _np_t5(state, ids, mask, {**HF_CONFIG, "feed_forward_proj": "relu"})
  # bf16 keeps 8 bits of mantissa: outputs of size ~1-4 agree to a few 1e-2.
  _assert_real_close(out["tokens"], ref, mask, 0.1)


def test_missing_tokenizer_fails_before_reading_weights(tmp_path, monkeypatch):
  _write_checkpoint(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  def no_read(*args, **kwargs):
    raise AssertionError("weights were read before the file check")
  monkeypatch.setattr(t5, "read_encoder_tensors", no_read)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    t5.load_pretrained(tmp_path)
