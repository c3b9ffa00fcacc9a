"""Tests of diffusion_jax.clip: the Flax CLIP, its contrastive loss and the HF loader.

The model and tokenizer are checked against a tiny random HF `CLIPModel` in
`tests/data/clip_tiny/` and its PyTorch outputs and HF tokenizations in
`tests/data/clip_tiny_torch.npz`, written by `tests/data/make_clip_reference.py` in a
torch-only venv (no torch or network needed here). The loss is checked against a
float64 numpy reference written out below.
"""
import importlib.util
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import clip
from diffusion_jax import text
from diffusion_jax.clip import hf_weights

DATA = pathlib.Path(__file__).parent / "data"
TINY_DIR = DATA / "clip_tiny"
# Measured max |Flax - torch| (torch 2.14.1 CPU eager, transformers 5.25.0): 1.0e-6 on
# image embeddings (|x| <= 2.6), 9.5e-7 on text embeddings and hidden states (|x| <= 4),
# 2.7e-6 on logits_per_image. Planted bugs move them by at least: 8e-4 (layer_norm_eps
# 1e-5 for 1e-3), 1e-2 (exact GELU for quick_gelu), 3 (pooling one token early).
ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
  """clip_tiny/ loaded by the project's loader, and the recorded torch outputs."""
  pytest.importorskip("safetensors")
  pytest.importorskip("tokenizers")
  module, params, config = clip.load_hf_clip(TINY_DIR)
  recorded = dict(np.load(DATA / "clip_tiny_torch.npz"))
  return dict(module=module, params=params, config=config, **recorded,
              tokenizer=clip.hf_clip_tokenizer(TINY_DIR))


def _embed(module, params, pixels=None, ids=None, mask=None):
  """`encode_image` and / or `encode_text` outputs as numpy."""
  variables = {"params": params}
  out = {}
  if pixels is not None:
    out["image"] = np.asarray(module.apply(variables, pixels, method="encode_image"))
  if ids is not None:
    hidden, embeds = module.apply(variables, ids, mask, method="encode_text")
    out["hidden"], out["text"] = np.asarray(hidden), np.asarray(embeds)
  return out


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_script():
  """tests/data/make_clip_reference.py as a module (imports only numpy at load)."""
  spec = importlib.util.spec_from_file_location("make_clip_reference",
                                                DATA / "make_clip_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------
# The tiny HF checkpoint vs its recorded PyTorch outputs.


def test_tiny_config_is_read(tiny):
  m = tiny["module"]
  assert (m.embed_dim, m.image_size, m.patch_size, m.image_channels) == (16, 16, 4, 3)
  assert (m.vision_width, m.vision_layers, m.vision_heads, m.vision_mlp_dim) == (32, 2, 2, 41)
  assert (m.text_width, m.text_layers, m.text_heads, m.text_mlp_dim) == (32, 2, 2, 37)
  assert (m.vocab_size, m.context_length) == (562, 24)
  assert (m.act, m.layer_norm_eps, m.logit_scale_init) == ("quick_gelu", 1e-3, 2.0)
  assert tiny["config"]["text_config"]["eos_token_id"] == 561


def test_tiny_clip_matches_recorded_torch(tiny):
  module, params = tiny["module"], tiny["params"]
  out = _embed(module, params, tiny["pixels"], tiny["ids"], tiny["mask"])
  assert out["image"].shape == (4, 16) and out["hidden"].shape == (10, 16, 32)
  np.testing.assert_allclose(out["image"], tiny["image_embeds"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["text"], tiny["text_embeds"], atol=ATOL, rtol=0)
  # Padded positions too: both attend causally to the real tokens before them.
  np.testing.assert_allclose(out["hidden"], tiny["hidden"], atol=ATOL, rtol=0)
  logits = np.exp(float(params["logit_scale"])) * _unit(out["image"]) @ _unit(out["text"]).T
  np.testing.assert_allclose(logits, tiny["logits_per_image"], atol=2 * ATOL, rtol=0)
  np.testing.assert_allclose(params["logit_scale"], tiny["logit_scale"], rtol=0)
  # __call__ gives the same three things.
  image, txt, scale = module.apply({"params": params}, tiny["pixels"], tiny["ids"], tiny["mask"])
  np.testing.assert_array_equal(image, out["image"])
  np.testing.assert_array_equal(txt, out["text"])
  assert float(scale) == float(params["logit_scale"])


def test_tiny_clip_pools_last_real_token_with_any_padding(tiny):
  """Rows padded with ids other than <|endoftext|>: HF pools at the first eos."""
  ids, mask = tiny["hand_ids"], tiny["hand_mask"]
  assert sorted(mask.sum(1)) == [3, 5, 9, 16] and (ids[~mask] != 561).all()
  out = _embed(tiny["module"], tiny["params"], ids=ids, mask=mask)
  np.testing.assert_allclose(out["hidden"], tiny["hand_hidden"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["text"], tiny["hand_text_embeds"], atol=ATOL, rtol=0)


def test_tiny_clip_gelu_matches_recorded_torch(tiny, tmp_path):
  """The same weights with hidden_act "gelu" (exact erf GELU in HF)."""
  config = json.loads((TINY_DIR / "config.json").read_text())
  for key in ("text_config", "vision_config"):
    config[key]["hidden_act"] = "gelu"
  (tmp_path / "config.json").write_text(json.dumps(config))
  shutil.copy(TINY_DIR / "model.safetensors", tmp_path)
  module, params, _ = clip.load_hf_clip(tmp_path)
  assert module.act == "gelu"
  out = _embed(module, params, tiny["pixels"], tiny["ids"], tiny["mask"])
  np.testing.assert_allclose(out["image"], tiny["image_embeds_gelu"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["text"], tiny["text_embeds_gelu"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["hidden"], tiny["hidden_gelu"], atol=ATOL, rtol=0)
  # The two activations differ enough for these tests to tell them apart.
  assert np.abs(tiny["image_embeds_gelu"] - tiny["image_embeds"]).max() > 100 * ATOL


def test_tiny_tokenizer_matches_hf(tiny):
  tokenizer, sentences = tiny["tokenizer"], [str(s) for s in tiny["sentences"]]
  assert sentences == _reference_script().SENTENCES
  assert tokenizer.pad_id == 561 and tokenizer.vocab_size == tiny["module"].vocab_size
  for suffix in ("_short", "", "_short"):  # the truncation length is not stale
    ref_ids = tiny["ids" + suffix]
    count, length = int(tiny["num_truncated" + suffix]), ref_ids.shape[1]
    with pytest.warns(UserWarning, match=rf"^{count} of 10 captions .* max_length={length} "):
      ids, mask = tokenizer.encode(sentences, length)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, tiny["mask" + suffix])
  assert (int(tiny["num_truncated"]), count) == (3, 8)
  # Every caption, cut or not, starts with <|startoftext|> and ends with <|endoftext|>.
  last = mask.sum(1) - 1
  assert (ids[:, 0] == 560).all() and (ids[np.arange(len(ids)), last] == 561).all()
  assert tokenizer.decode(tiny["ids"]) == [str(s) for s in tiny["decoded"]]


# ---------------------------------------------------------------------------
# The module itself (default, small config).


@pytest.fixture(scope="module")
def small():
  module = clip.CLIP()
  pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  ids, mask = text.ByteTokenizer().encode(["a red circle", "two blue squares"], 20)
  params = jax.jit(module.init)(jax.random.key(1), pixels, ids, mask)["params"]
  return dict(module=module, params=params, pixels=pixels, ids=ids, mask=mask)


def test_default_shapes_and_init(small):
  module, params = small["module"], small["params"]
  assert module.vocab_size == text.ByteTokenizer.vocab_size == 259
  image, txt, scale = module.apply({"params": params}, small["pixels"], small["ids"],
                                   small["mask"])
  assert image.shape == txt.shape == (2, 64) and image.dtype == txt.dtype == jnp.float32
  assert scale.shape == () and math.isclose(float(scale), math.log(1 / 0.07), rel_tol=1e-6)
  hidden, _ = module.apply({"params": params}, small["ids"], small["mask"],
                           method="encode_text")
  assert hidden.shape == (2, 20, 64)
  assert params["vision_model"]["embeddings"]["position_embedding"]["embedding"].shape == (65, 64)
  names = {hf_weights.hf_name(p) for p in hf_weights.abstract_params(module)}
  assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in names
  assert "vision_model.pre_layrnorm.weight" in names and "logit_scale" in names


def test_bad_shapes_are_refused(small):
  module, variables = small["module"], {"params": small["params"]}
  with pytest.raises(ValueError, match=r"pixels must be \[B, 32, 32, 3\]"):
    module.apply(variables, jnp.zeros((2, 3, 32, 32)), method="encode_image")
  ids, mask = text.ByteTokenizer().encode(["x"], 73)
  with pytest.raises(ValueError, match="exceeds context_length=72"):
    module.apply(variables, ids, mask, method="encode_text")


def test_text_attention_is_causal(small):
  module, ids, mask = small["module"], small["ids"], small["mask"]
  variables = {"params": small["params"]}
  hidden, _ = module.apply(variables, ids, mask, method="encode_text")
  changed = ids.copy()
  changed[:, 5] = 100
  hidden2, _ = module.apply(variables, changed, mask, method="encode_text")
  np.testing.assert_array_equal(hidden2[:, :5], hidden[:, :5])
  assert np.abs(hidden2[:, 5:] - hidden[:, 5:]).min(axis=-1).max() > 0
  assert (np.abs(hidden2[:, 5:int(mask[0].sum())] - hidden[:, 5:int(mask[0].sum())])
          .max(axis=-1) > 1e-3).all()


def test_padding_does_not_change_the_text_embedding(small):
  module, ids, mask = small["module"], small["ids"], small["mask"]
  variables = {"params": small["params"]}
  _, embeds = module.apply(variables, ids, mask, method="encode_text")
  other = np.where(mask, ids, 77)  # padding ids other than 0
  longer = np.pad(other, ((0, 0), (0, 9)), constant_values=5)
  for pad_ids, pad_mask in ((other, mask), (longer, np.pad(mask, ((0, 0), (0, 9))))):
    _, embeds2 = module.apply(variables, pad_ids, pad_mask, method="encode_text")
    np.testing.assert_allclose(embeds2, embeds, atol=1e-6, rtol=0)
  # ... but the mask does: pooling one token earlier gives another embedding.
  one_less = mask & (np.cumsum(mask, 1) < mask.sum(1, keepdims=True))
  _, shorter = module.apply(variables, ids, one_less, method="encode_text")
  assert np.abs(shorter - embeds).max() > 1e-2


def test_contrastive_training_step_has_gradients(small):
  module = small["module"]

  def loss_fn(params):
    outs = module.apply({"params": params}, small["pixels"], small["ids"], small["mask"])
    return clip.contrastive_loss(*outs)[0]

  grads = jax.jit(jax.grad(loss_fn))(small["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert float(grads["logit_scale"]) != 0
  assert np.abs(grads["vision_model"]["embeddings"]["patch_embedding"]["kernel"]).max() > 0


def test_preprocess():
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(clip.preprocess(images, 16), images)
  out = clip.preprocess(images, 16, clip.CLIP_MEAN, clip.CLIP_STD)
  want = ((np.asarray(images) + 1) / 2 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert clip.preprocess(images, 8).shape == (2, 8, 8, 3)
  # A wide image is centre-cropped: the constant middle square comes out constant.
  wide = jnp.concatenate([-jnp.ones((1, 16, 8, 3)), 0.5 * jnp.ones((1, 16, 16, 3)),
                          jnp.ones((1, 16, 8, 3))], axis=2)
  np.testing.assert_allclose(clip.preprocess(wide, 8), 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="both mean and std"):
    clip.preprocess(images, 16, mean=clip.CLIP_MEAN)


# ---------------------------------------------------------------------------
# Saving, and loader errors.


def _write(folder: pathlib.Path, config: dict, state: dict) -> pathlib.Path:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  save_file(state, str(folder / "model.safetensors"))
  return folder


def _tiny_state() -> dict:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(TINY_DIR / "model.safetensors"))


def test_round_trip_is_exact(tiny, tmp_path):
  state = _tiny_state()
  # Every HF tensor is used, unchanged (incl. the patch conv's axis order).
  saved = hf_weights.to_state_dict(tiny["params"])
  assert sorted(saved) == sorted(state)
  for name, value in saved.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)
  clip.save_hf_clip(tiny["module"], tiny["params"], tmp_path, config=tiny["config"])
  module, params, config = clip.load_hf_clip(tmp_path)
  assert module == tiny["module"]
  jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])
  assert config["text_config"]["eos_token_id"] == 561  # kept from the base config
  # A module with default (None) MLP sizes saves 4 x width.
  small_module = clip.CLIP(embed_dim=8, image_size=8, vision_width=16, text_width=16,
                           vocab_size=50, context_length=10, act="gelu")
  pixels, ids = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4), jnp.int32)
  small_params = jax.jit(small_module.init)(jax.random.key(0), pixels, ids, ids == 0)["params"]
  clip.save_hf_clip(small_module, small_params, tmp_path / "small")
  loaded, loaded_params, _ = clip.load_hf_clip(tmp_path / "small")
  assert (loaded.vision_mlp_dim, loaded.text_mlp_dim, loaded.act) == (64, 64, "gelu")
  jax.tree.map(np.testing.assert_array_equal, loaded_params, small_params)


def test_unused_and_missing_tensors_are_named(tmp_path):
  config = json.loads((TINY_DIR / "config.json").read_text())
  state = _tiny_state()
  extra = {**state, "text_model.encoder.layers.2.mlp.fc1.bias": np.zeros(37, np.float32)}
  with pytest.raises(ValueError, match=r"unused tensors \(1\): \['text_model\.encoder\.layers"
                     r"\.2\.mlp\.fc1\.bias'\]"):
    clip.load_hf_clip(_write(tmp_path / "extra", config, extra))
  missing = {k: v for k, v in state.items() if k != "vision_model.post_layernorm.bias"}
  with pytest.raises(ValueError, match=r"missing tensors \(1\): \['vision_model\.post_layernorm"):
    clip.load_hf_clip(_write(tmp_path / "missing", config, missing))
  # The position_ids buffers that older transformers saved are ignored.
  buffers = {**state, "text_model.embeddings.position_ids": np.arange(24)[None],
             "vision_model.embeddings.position_ids": np.arange(17)[None]}
  clip.load_hf_clip(_write(tmp_path / "buffers", config, buffers))


def test_shape_mismatch_names_tensor_and_config_field(tmp_path):
  config = json.loads((TINY_DIR / "config.json").read_text())
  with pytest.raises(ValueError, match=r"visual_projection\.weight: expected \[8, 32\] \(config "
                     r"projection_dim, vision_config\.hidden_size\), found \[16, 32\]"):
    clip.load_hf_clip(_write(tmp_path, {**config, "projection_dim": 8}, _tiny_state()))


@pytest.mark.parametrize("key,value,message", [
    ("text_config", {"hidden_act": "relu"}, "text_config.hidden_act='relu'"),
    ("vision_config", {"hidden_act": "gelu_new"}, "vision_config.hidden_act='gelu_new'"),
    ("vision_config", {"hidden_act": "gelu"}, "text_config.hidden_act='quick_gelu' differs"),
    ("vision_config", {"layer_norm_eps": 1e-5}, "layer_norm_eps=0.001 differs"),
    ("vision_config", {"image_size": [16, 8]}, r"vision_config.image_size=\[16, 8\]"),
])
def test_unsupported_config_is_refused(key, value, message):
  config = json.loads((TINY_DIR / "config.json").read_text())
  config[key].update(value)
  with pytest.raises(ValueError, match=message):
    hf_weights.clip_from_hf_config(config)
  with pytest.raises(ValueError, match="model_type='siglip'"):
    hf_weights.clip_from_hf_config({**config, "model_type": "siglip"})


# ---------------------------------------------------------------------------
# The contrastive loss.


def _np_loss(img, txt, logit_scale, same=None, soft=False):
  """float64 numpy CLIP loss and accuracies, log-sum-exp written out."""
  img, txt = _unit(np.float64(img)), _unit(np.float64(txt))
  b = len(img)
  same = np.eye(b, dtype=bool) if same is None else same | np.eye(b, dtype=bool)
  logits = min(math.exp(logit_scale), 100.0) * img @ txt.T

  def xent(x, targets):
    peak = x.max(axis=1, keepdims=True)
    log_probs = x - (peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True)))
    targets = targets / targets.sum(axis=1, keepdims=True)
    return -(targets * log_probs).sum(axis=1).mean()

  targets = (same if soft else np.eye(b, dtype=bool)).astype(np.float64)
  loss = 0.5 * (xent(logits, targets) + xent(logits.T, targets.T))
  i2t = same[np.arange(b), logits.argmax(1)].mean()
  t2i = same[logits.argmax(0), np.arange(b)].mean()
  return loss, i2t, t2i


def _pairs(seed=5, b=6, e=5):
  """Images and captions that partly match, with rows of very different norms."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((b, e)) * rng.uniform(0.1, 10, (b, 1))
  txt = (img + 1.5 * rng.standard_normal((b, e))) * rng.uniform(0.1, 10, (b, 1))
  return img.astype(np.float32), txt.astype(np.float32)


@pytest.mark.parametrize("logit_scale", [0.3, math.log(1 / 0.07), math.log(300.0)])
def test_loss_matches_numpy(logit_scale):
  img, txt = _pairs()
  loss, metrics = jax.jit(clip.contrastive_loss)(img, txt, logit_scale)
  want_loss, i2t, t2i = _np_loss(img, txt, logit_scale)
  # The inputs are asymmetric: a transposed logits matrix would change the metrics.
  assert 0 < i2t < 1 and 0 < t2i < 1 and i2t != t2i
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)
  np.testing.assert_allclose([metrics["i2t_accuracy"], metrics["t2i_accuracy"]], [i2t, t2i])
  np.testing.assert_allclose(metrics["scale"], min(math.exp(logit_scale), 100.0), rtol=1e-6)


def test_logit_scale_gradient_sign():
  img, _ = _pairs()
  grad = jax.grad(lambda s, t: clip.contrastive_loss(img, t, s)[0])
  aligned = img + 0.01 * np.random.default_rng(0).standard_normal(img.shape).astype(np.float32)
  # Matching pairs most similar: sharper logits lower the loss; mismatched: raise it.
  assert float(grad(1.0, aligned)) < 0
  assert float(grad(1.0, np.roll(img, 1, axis=0) - 0.5 * img)) > 0
  # Above the clamp at 100 the scale has no gradient.
  assert float(grad(math.log(200.0), aligned)) == 0


def test_duplicate_captions():
  captions = ["a red circle", "a blue square", "a red circle", "a star", "a red circle"]
  ids, _ = text.ByteTokenizer().encode(captions, 16)
  rng = np.random.default_rng(0)
  txt = rng.standard_normal((5, 5)).astype(np.float32)
  txt[[2, 4]] = txt[0]  # the same caption gives the same text embedding
  # Each image is nearest its own caption (copies tie); norms differ.
  img = ((txt + 0.2 * rng.standard_normal(txt.shape)) * rng.uniform(0.2, 5, (5, 1))
         ).astype(np.float32)
  same = np.array([[a == b for b in captions] for a in captions])
  np.testing.assert_array_equal(clip.same_caption(ids), same)
  np.testing.assert_array_equal(clip.same_caption(np.array([7, 1, 7, 2, 7])), same)
  plain_loss, plain = clip.contrastive_loss(img, txt, 2.0)
  loss, metrics = clip.contrastive_loss(img, txt, 2.0, text_ids=ids)
  # Copies are negatives in the loss (as CLIP), but count as correct in the accuracy.
  assert float(loss) == float(plain_loss)
  _, i2t, t2i = _np_loss(img, txt, 2.0, same)
  np.testing.assert_allclose([metrics["i2t_accuracy"], metrics["t2i_accuracy"]], [i2t, t2i])
  # Identical text rows tie: argmax picks the first copy, wrong without `same`.
  np.testing.assert_allclose([metrics["i2t_accuracy"], plain["i2t_accuracy"]], [1.0, 0.6])
  assert float(metrics["t2i_accuracy"]) == 1.0 > float(plain["t2i_accuracy"])
  # Copies with identical embeddings: soft targets give the same loss (the copies'
  # logits equal the target's). They differ once the copies' embeddings differ.
  soft, soft_metrics = clip.contrastive_loss(img, txt, 2.0, soft_targets=True, same=same)
  np.testing.assert_allclose(soft, loss, rtol=1e-6)
  assert float(soft_metrics["i2t_accuracy"]) == float(metrics["i2t_accuracy"])
  txt[[2, 4]] += 0.5 * rng.standard_normal((2, 5)).astype(np.float32)
  hard = clip.contrastive_loss(img, txt, 2.0)[0]
  np.testing.assert_allclose(hard, _np_loss(img, txt, 2.0)[0], rtol=1e-5)
  for kwargs in (dict(same=same), dict(text_ids=ids)):
    soft = clip.contrastive_loss(img, txt, 2.0, soft_targets=True, **kwargs)[0]
    np.testing.assert_allclose(soft, _np_loss(img, txt, 2.0, same, soft=True)[0], rtol=1e-5)
    assert abs(float(soft) - float(hard)) > 1e-3
  with pytest.raises(ValueError, match="not both"):
    clip.contrastive_loss(img, txt, 2.0, text_ids=ids, same=same)
  with pytest.raises(ValueError, match=r"same must be \[5, 5\]"):
    clip.contrastive_loss(img, txt, 2.0, same=same[:4, :4])
  # The diagonal is implied: an all-False `same` is "all captions distinct".
  none_same, _ = clip.contrastive_loss(img, txt, 2.0, same=np.zeros((5, 5), bool),
                                       soft_targets=True)
  np.testing.assert_allclose(none_same, hard, rtol=1e-6)
