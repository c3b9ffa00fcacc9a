"""unCLIP: the decoder's image-embedding kind, slerp and the metrics against closed
forms, and the whole pipeline (CLIP -> prior -> decoder) on tiny models."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_clip, shapes_unclip_decoder, shapes_unclip_prior, unclip
from diffusion_jax import builders, checkpointing, config_lib, evaluate, models, sample, train
from diffusion_jax.conditioning import Conditioning, ImageEmbedding, base
from diffusion_jax.unclip import clip_encoder, evaluation, pipeline
from tests.conftest import apply_overrides, perturbed_params


def _decoder(clip_workdir="unused", **overrides):
  config = shapes_unclip_decoder.get_config(clip_workdir)
  m = config.model
  m.ch, m.ch_mult, m.attn_resolutions, m.cross_attn_resolutions = 32, (1,), (), (16,)
  return apply_overrides(config, **overrides)


# ---- the decoder's conditioning kind ----------------------------------------

def test_decoder_keys_shapes_and_no_parameters_when_off():
  config = _decoder()
  config_lib.validate(config)
  c = Conditioning(config)
  assert c.inputs == ("image_embeds",) and c.guidable and not c.upsamples
  emb = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
  request = c.request(4, image_embeds=emb)
  np.testing.assert_array_equal(request.image_embeds, emb)
  cond = c.check(request.cond, 4)
  model_cond = c.for_sampling(cond, jax.random.key(0), builders.make_schedule(config))
  init = c.init(4)
  for got in (model_cond, c.null(model_cond)):
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        k: (v.shape, v.dtype) for k, v in init.items()}
  np.testing.assert_array_equal(np.asarray(c.null(model_cond)["image_embed"]), 0.0)
  with_emb = jax.eval_shape(lambda: builders.init_params(
      models.create_model(config.model, 3), config, jax.random.key(0)))
  off = _decoder(model__image_embed_dim=0, model__cross_attn_dim=0,
                 model__cross_attn_resolutions=())
  without = jax.eval_shape(lambda: builders.init_params(
      models.create_model(off.model, 3), off, jax.random.key(0)))
  assert not [k for k in without if "image_embed" in k]
  count = lambda p: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
  # Off, the U-Net is the unconditional one: no parameter, not even an unused one.
  plain = apply_overrides(_decoder(), model__image_embed_dim=0, model__cross_attn_dim=0,
                          model__cross_attn_resolutions=(), conditioning__clip_workdir="")
  assert count(without) == count(jax.eval_shape(lambda: builders.init_params(
      models.create_model(plain.model, 3), plain, jax.random.key(0))))
  ch4, d, k, x = 4 * 32, 64, 4, 64
  added = (d * ch4 + ch4) + (d * k * x + k * x)  # image_embed_proj + image_embed_tokens
  assert count(with_emb["image_embed_proj"]) + count(with_emb["image_embed_tokens"]) == added


def test_the_embedding_changes_the_output_and_is_dropped_at_its_rate():
  config = _decoder()
  model = models.create_model(config.model, 3)
  params = perturbed_params(model, config)
  x, t = jnp.zeros((2, 32, 32, 3)), jnp.full((2,), 500, jnp.int32)
  apply = jax.jit(lambda e: model.apply({"params": params}, x, t, {"image_embed": e},
                                        train=False))
  e = np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)
  e2 = e.copy()
  e2[1] *= -1.0
  a, b = np.asarray(apply(e)), np.asarray(apply(e2))
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)
  assert np.abs(a[1] - b[1]).max() > 1e-3
  kind = ImageEmbedding(apply_overrides(config, conditioning__p_uncond_image_embed=0.2))
  n = 20000
  rng = jax.random.key(3)
  out = np.asarray(kind.train({"image_embed": jnp.ones((n, 64))}, rng, None)["image_embed"])
  dropped = np.all(out == 0.0, axis=1)
  want = np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, base.EMBED_DROP), 0.2, (n,)))
  np.testing.assert_array_equal(dropped, want)  # the draw, exactly
  assert abs(dropped.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / n)
  np.testing.assert_array_equal(out[~dropped], 1.0)


def test_decoder_config_errors():
  with pytest.raises(ValueError, match="needs exactly one CLIP"):
    config_lib.validate(_decoder(conditioning__clip_workdir=""))
  with pytest.raises(ValueError, match="image_embed_tokens=4 makes cross-attention tokens"):
    config_lib.validate(_decoder(model__cross_attn_dim=0, model__cross_attn_resolutions=()))
  c = Conditioning(_decoder())
  with pytest.raises(ValueError, match="draws from CLIP image embeddings"):
    c.request(4)
  with pytest.raises(ValueError, match=r"takes \[4, 64\]"):
    c.request(4, image_embeds=np.zeros((4, 32)))
  with pytest.raises(ValueError, match="NaN"):
    c.check({"image_embed": np.full((4, 64), np.nan, np.float32)}, 4)


def test_prior_and_clip_config_errors():
  prior = shapes_unclip_prior.get_config("clip")
  config_lib.validate(prior)
  with pytest.raises(ValueError, match="sample.thresholding='none'"):
    config_lib.validate(apply_overrides(prior, sample__thresholding="static"))
  with pytest.raises(ValueError, match="needs conditioning.type='clip_text'"):
    config_lib.validate(apply_overrides(shapes_unclip_prior.get_config("c"),
                                        conditioning__type="text"))
  clip = shapes_clip.get_config()
  config_lib.validate(clip)
  with pytest.raises(ValueError, match="training.sample_every_steps=0"):
    config_lib.validate(apply_overrides(clip, training__sample_every_steps=10))
  with pytest.raises(ValueError, match="model.clip.image_size=16 must be data.image_size=32"):
    config_lib.validate(_with(shapes_clip.get_config(), image_size=16))


def _with(config, **clip_fields):
  for k, v in clip_fields.items():
    config.model.clip[k] = v
  return config


# ---- maths against closed forms ---------------------------------------------

def test_slerp_against_the_closed_form():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
  a = a / np.linalg.norm(a, axis=1, keepdims=True) * np.sqrt(8)
  b = b / np.linalg.norm(b, axis=1, keepdims=True) * np.sqrt(8)
  w = np.array([0.0, 0.25, 0.5, 1.0])
  out = pipeline.slerp(a, b, w).astype(np.float64)
  np.testing.assert_allclose(out[0], a, atol=1e-6)
  np.testing.assert_allclose(out[-1], b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.sqrt(8), rtol=1e-6)
  omega = np.arccos(np.sum(a * b, 1) / 8.0)
  for k, wk in enumerate(w):  # Shoemake's formula, in float64
    want = (np.sin((1 - wk) * omega)[:, None] * a + np.sin(wk * omega)[:, None] * b
            ) / np.sin(omega)[:, None]
    np.testing.assert_allclose(out[k], want, atol=1e-5)
    ang = np.arccos(np.clip(np.sum(out[k] * a, 1) / 8.0, -1, 1))  # linear in the weight
    np.testing.assert_allclose(ang, wk * omega, atol=5e-4)
  e1, e2 = np.eye(2)[None, 0] * 2, np.eye(2)[None, 1] * 2  # orthogonal, norm 2
  np.testing.assert_allclose(pipeline.slerp(e1, e2, [0.5])[0, 0], [np.sqrt(2), np.sqrt(2)],
                             atol=1e-6)
  same = pipeline.slerp(a, a, w)  # one direction: the limit, not NaN
  np.testing.assert_allclose(same[2], a, atol=1e-5)


class _FakeClip:
  """An image 'embedding' that is the image's mean colour, and known text embeddings."""

  def __init__(self, text=None):
    self._text = text or {}

  def image_embeddings(self, images):
    return np.asarray(images, np.float32).reshape(len(images), -1, 3).mean(1) + 2.0

  def text(self, captions):
    return {"text_embed": np.stack([self._text[c] for c in captions])}


def test_diversity_against_explicit_sums():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  captions = ["a", "a", "a", "b", "c"]
  got = evaluation.diversity(_FakeClip(), images, captions)
  emb = _FakeClip().image_embeddings(images.astype(np.float32) / 127.5 - 1.0).astype(float)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  pix = images / 255.0
  pairs = [(0, 1), (0, 2), (1, 2)]
  want_clip = np.mean([1 - emb[i] @ emb[j] for i, j in pairs])
  want_pix = np.mean([np.sqrt(((pix[i] - pix[j]) ** 2).mean()) for i, j in pairs])
  assert got["num_groups"] == 1
  np.testing.assert_allclose(got["clip_distance"], want_clip, rtol=1e-5)
  np.testing.assert_allclose(got["pixel_rms"], want_pix, rtol=1e-10)
  with pytest.raises(ValueError, match="two or more samples"):
    evaluation.diversity(_FakeClip(), images[3:], ["b", "c"])


def test_clip_retrieval_counts_top1_by_seen_and_held_out():
  seen = "a small red circle"
  held = "a small green circle"  # green circles are held out of the shapes train split
  other = "a large white square"
  from diffusion_jax.datasets import shapes  # pylint: disable=g-import-not-at-top
  assert shapes.is_held_out(shapes.parse_caption(held))
  assert not shapes.is_held_out(shapes.parse_caption(seen))
  # Images whose mean colour (+2) points at a caption's embedding.
  text = {seen: np.array([1.0, 0.0, 0.0]), held: np.array([0.0, 1.0, 0.0]),
          other: np.array([0.0, 0.0, 1.0])}
  def img(v):
    return np.broadcast_to((np.asarray(v) * 3.0 - 2.0).astype(np.float32), (2, 2, 3))
  images = np.stack([img([1, 0, 0]), img([0, 0, 1]), img([0, 1, 0]), img([0, 0, 1])])
  captions = [seen, seen, held, other]  # image 1 points at `other`: wrong
  got = evaluation.clip_retrieval(_FakeClip(text), images, captions)
  assert got["top1"] == {"all": 0.75, "seen": 2 / 3, "held_out": 1.0}
  assert got["num_distinct_captions"] == 3


# ---- the pipeline on tiny models --------------------------------------------

def _tiny(config, data_dir):
  config.data.data_dir = data_dir
  t = config.training
  t.batch_size, t.num_train_steps, t.checkpoint_every_steps, t.log_every_steps = 16, 2, 2, 1
  config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 3, 8, 8
  return config


@pytest.fixture(scope="module")
def runs(shapes_dir, tmp_path_factory):
  """Workdirs of a CLIP, a prior and a decoder trained 2 steps each on shapes."""
  root = str(tmp_path_factory.mktemp("unclip"))
  clip_dir, prior_dir, decoder_dir = (os.path.join(root, n) for n in ("clip", "prior", "dec"))
  clip = _tiny(shapes_clip.get_config(), shapes_dir)
  _with(clip, vision_layers=1, text_layers=1)
  train.train_and_evaluate(clip, clip_dir)
  prior = _tiny(shapes_unclip_prior.get_config(clip_dir), shapes_dir)
  prior.model.prior.num_layers = 1
  train.train_and_evaluate(prior, prior_dir)
  decoder = _tiny(_decoder(clip_dir), shapes_dir)
  decoder.training.sample_every_steps, decoder.training.num_grid_samples = 2, 4
  train.train_and_evaluate(decoder, decoder_dir)
  return root, clip_dir, prior_dir, decoder_dir


def _unclip_config(runs, **fields):
  _, _, prior_dir, decoder_dir = runs
  config = unclip.get_config(f"{prior_dir},{decoder_dir}")
  config.unclip.num_samples = config.unclip.batch_size = 8
  for part in (config.prior, config.stage_0):
    part.sample.num_steps = 3
  for k, v in fields.items():
    config.unclip[k] = v
  return config


def test_pipeline_captions_variations_and_interpolations(runs, tmp_path):
  out = str(tmp_path)
  assert os.path.isfile(os.path.join(runs[3], "grids", "step_00000002.png"))
  config = _unclip_config(runs, captions="a small red circle;a large blue square")
  (path,) = pipeline.sample_unclip(config, out)
  with np.load(path) as f:
    images, captions, embeds = f["arr_0"], list(f["captions"]), f["image_embeds"]
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
  assert captions == ["a small red circle", "a large blue square"] * 4
  np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 8.0, rtol=1e-5)  # sqrt(64)
  # The "no prior" baseline: the caption's own CLIP text embedding, scaled alike.
  base_config = _unclip_config(runs, prior="none")
  clip = clip_encoder.FrozenCLIP.from_config(base_config.prior)
  got = pipeline.prior_embeddings(base_config, captions)
  np.testing.assert_allclose(got, clip.text(captions)["text_embed"], rtol=1e-6)
  # Prior guidance is a runtime input: another scale, other embeddings.
  guided = _unclip_config(runs)
  guided.prior.sample.guidance_scale = 4.0
  assert np.abs(pipeline.prior_embeddings(guided, captions) - embeds).max() > 1e-3

  var = _unclip_config(runs, mode="variations", source=path, num_samples=2, num_variations=3,
                       name="var")
  (vpath,) = pipeline.sample_unclip(var, out)
  with np.load(vpath) as f:
    assert f["arr_0"].shape == (6, 32, 32, 3)
    want = np.repeat(clip.image_embeddings(images[:2].astype(np.float32) / 127.5 - 1.0), 3, 0)
    np.testing.assert_allclose(f["image_embeds"], want, rtol=1e-5)
  assert os.path.isfile(os.path.join(out, "samples", "var.png"))

  interp = _unclip_config(runs, mode="interpolations", source=path, num_pairs=1,
                          interpolation_steps=3, name="interp")
  (ipath,) = pipeline.sample_unclip(interp, out)
  with np.load(ipath) as f:
    assert f["arr_0"].shape == (3, 32, 32, 3)
    src = clip.image_embeddings(images[:2].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(f["image_embeds"][0], src[0], rtol=1e-5)
    np.testing.assert_allclose(f["image_embeds"][-1], src[1], rtol=1e-5)


def test_eval_of_the_pipeline_and_of_the_clip(runs, tmp_path):
  config = _unclip_config(runs)
  report = evaluation.evaluate_unclip(config, str(tmp_path))
  m = report["metrics"]
  assert set(m["caption_accuracy"]) >= {"seen", "held_out", "num_samples"}
  assert set(m["embeddings"]) == {"cos_to_image", "cos_text_embedding_to_image",
                                  "caption_retrieval"}
  with open(report["report_file"]) as f:
    assert json.load(f)["num_samples"] == 8
  clip_config = checkpointing.load_config(runs[1])
  clip_config.eval.num_samples = 20
  r = evaluate.evaluate(clip_config, runs[1])
  assert r["metrics"]["retrieval"]["num_images"] == 20
  assert 0.0 <= r["metrics"]["retrieval"]["top1"]["all"] <= 1.0


def test_bad_inputs_to_the_pipeline(runs, tmp_path):
  root, clip_dir, prior_dir, decoder_dir = runs
  # A CLIP or a prior alone draws no images.
  with pytest.raises(ValueError, match="draws no images by itself"):
    sample.sample_and_save(checkpointing.load_config(clip_dir), clip_dir)
  with pytest.raises(ValueError, match="evaluate it in its pipeline"):
    evaluate.evaluate(checkpointing.load_config(prior_dir), prior_dir)
  # Variations of images of another size.
  small = os.path.join(str(tmp_path), "small.npz")
  np.savez(small, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match=r"shape \(16, 16, 3\), but the decoder draws"):
    pipeline.sample_unclip(_unclip_config(runs, mode="variations", source=small), str(tmp_path))
  # A decoder built for another CLIP width.
  wide = _unclip_config(runs)
  wide.stage_0.model.image_embed_dim = 32
  with pytest.raises(ValueError, match="gives 64-wide embeddings"):
    pipeline.check(wide)
  # A prior trained on another CLIP's embeddings.
  other_clip = os.path.join(root, "clip2")  # another workdir: another CLIP to the pipeline
  if not os.path.isdir(other_clip):
    shutil.copytree(clip_dir, other_clip)
  mixed = _unclip_config(runs)
  mixed.prior.conditioning.clip_workdir = other_clip
  with pytest.raises(ValueError, match="must share one CLIP"):
    pipeline.check(mixed)
  # A prior whose widths are not the CLIP's.
  narrow = _unclip_config(runs)
  narrow.prior.model.prior.text_width = 32
  with pytest.raises(ValueError, match="model.prior.text_width=32, but the CLIP"):
    pipeline.check(narrow)
  # clip_workdir pointing at a run that is not a CLIP.
  not_clip = _decoder(decoder_dir)
  with pytest.raises(ValueError, match="not a CLIP"):
    clip_encoder.FrozenCLIP.from_config(not_clip)


def test_a_hugging_face_clip_folder_serves_as_the_frozen_clip():
  path = os.path.join(os.path.dirname(__file__), "data", "clip_tiny")
  probe = apply_overrides(_decoder(""), conditioning__clip_path=path)
  clip = clip_encoder.FrozenCLIP.from_config(probe)
  assert clip is clip_encoder.FrozenCLIP.from_config(probe)  # loaded once
  images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  emb = clip.image_embeddings(images)  # resized to the CLIP's own size on the way
  d = clip.embed_dim
  assert emb.shape == (3, d)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), np.sqrt(d), rtol=1e-5)
  text = clip.text(["a red circle", "a red circle", "a blue square"])
  np.testing.assert_array_equal(text["text_embed"][0], text["text_embed"][1])
  assert text["text_tokens"].shape[2] == clip.text_width
  np.testing.assert_array_equal(text["text_tokens"][~text["text_mask"]], 0.0)
  with pytest.raises(ValueError, match=f"gives {d}-wide embeddings"):
    clip.check_embed_dim(d + 1, "model.image_embed_dim")
