"""Super-resolution stages and cascades: augmentation maths, model input, data pairs,
training, the cascade pipeline, PSNR/SSIM."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import cascade as cascade_config
from configs import test as test_config
from diffusion_jax import (builders, cascade, config_lib, diffusion, generation,
                           input_pipeline, models, parallel, schedules, superres,
                           train)
from diffusion_jax.conditioning import Conditioning
from diffusion_jax.evaluation import image_metrics
from tests.conftest import apply_overrides, perturbed_params

# ---- Augmentation maths -------------------------------------------------------------


def test_level_zero_leaves_the_input_unchanged_and_last_level_destroys_it():
  schedule = schedules.make_schedule("linear", 1000)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (64, 8, 8, 3)).astype(np.float32)
  noise = rng.standard_normal(x.shape).astype(np.float32)
  same = superres.noise_augment(schedule, x, jnp.zeros((64,), jnp.int32), noise)
  np.testing.assert_array_equal(np.asarray(same), x)
  gone = np.asarray(superres.noise_augment(schedule, x, jnp.full((64,), 999), noise))
  corr = np.corrcoef(gone.ravel(), x.ravel())[0, 1]
  assert abs(corr) < 0.02, corr  # signal weight sqrt(abar[998]) ~ 0.0064
  np.testing.assert_allclose(gone.std(), 1.0, rtol=0.05)


def test_noise_augment_matches_the_forward_process_in_float64():
  schedule = schedules.make_schedule("cosine", 100)
  betas = np.asarray(schedule.betas, np.float64)
  abar = np.cumprod(1.0 - betas)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (5, 4, 4, 1))
  noise = rng.standard_normal(x.shape)
  level = np.array([0, 1, 2, 50, 99])
  sig = np.where(level == 0, 1.0, abar[np.maximum(level - 1, 0)])[:, None, None, None]
  want = np.sqrt(sig) * x + np.sqrt(1 - sig) * noise
  got = superres.noise_augment(schedule, jnp.float32(x), jnp.asarray(level),
                               jnp.float32(noise))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
  # Level k >= 1 is the forward process q(x_t | x_0) at timestep index k - 1.
  q = diffusion.q_sample(schedule, jnp.float32(x[1:]), jnp.asarray(level[1:] - 1),
                         jnp.float32(noise[1:]))
  np.testing.assert_allclose(np.asarray(got)[1:], np.asarray(q), atol=1e-6)


def test_level_from_fraction():
  assert superres.level_from_fraction(0.0, 1000) == 0
  assert superres.level_from_fraction(0.2, 1000) == 200
  assert superres.level_from_fraction(1.0, 1000) == 999
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    superres.level_from_fraction(1.5, 1000)


def test_gaussian_blur_matches_scipy_per_example_sigma():
  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (3, 12, 10, 2))
  sigma = np.array([0.4, 0.6, 1.3])
  radius = 6
  got = np.asarray(superres.gaussian_blur(jnp.float32(x), jnp.float32(sigma), radius))
  for i, s in enumerate(sigma):
    want = ndimage.gaussian_filter1d(x[i], s, axis=0, mode="reflect", radius=radius)
    want = ndimage.gaussian_filter1d(want, s, axis=1, mode="reflect", radius=radius)
    np.testing.assert_allclose(got[i], want, atol=1e-5)
  same = superres.gaussian_blur(jnp.float32(x), jnp.zeros((3,)), 3)
  np.testing.assert_allclose(np.asarray(same), x, atol=1e-6)


def test_upsample_nearest_repeats_pixels():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  up = np.asarray(superres.upsample(x, 8, "nearest"))
  np.testing.assert_array_equal(up, np.repeat(np.repeat(x, 2, 1), 2, 2))
  with pytest.raises(ValueError, match="lanczos"):
    superres.upsample(x, 8, "lanczos")


def _keys_cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def _ref_weights(n_in, n_out, kernel):
  """[n_out, n_in] float64: output pixel j samples the input at the half-pixel-centre
  coordinate s = (j + 1/2) n_in / n_out - 1/2, weighting input pixel i by
  kernel(s - i); taps outside [0, n_in) are dropped and the rest renormalised (the
  edge convention of PIL and of jax.image.resize)."""
  s = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  w = kernel(s[:, None] - np.arange(n_in)[None, :])
  return w / w.sum(axis=1, keepdims=True)


def _ref_resize(x, size, kernel):
  x = np.asarray(x, np.float64)
  wh, ww = _ref_weights(x.shape[1], size, kernel), _ref_weights(x.shape[2], size, kernel)
  return np.einsum("yh,bhwc,xw->byxc", wh, x, ww)


_TRIANGLE = lambda d: np.maximum(0.0, 1.0 - np.abs(d))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_upsample_matches_float64_and_pil_interpolation(method):
  """References: a float64 numpy separable resize (triangle kernel for bilinear,
  Keys' cubic with a = -0.5 for bicubic, half-pixel centres), and PIL's own float
  ("F" mode) BILINEAR / BICUBIC resize, per channel."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 5, 7, 2)).astype(np.float32)  # non-square, non-integer factors
  kernel = _TRIANGLE if method == "bilinear" else _keys_cubic
  for size in (12, 10):
    got = np.asarray(superres.upsample(jnp.asarray(x), size, method))
    assert got.shape == (2, size, size, 2) and got.dtype == np.float32
    ref = _ref_resize(x, size, kernel)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    pil_method = Image.BILINEAR if method == "bilinear" else Image.BICUBIC
    pil = np.stack([np.stack([np.asarray(Image.fromarray(x[b, :, :, c], mode="F").resize(
        (size, size), pil_method)) for c in range(2)], axis=-1) for b in range(2)])
    np.testing.assert_allclose(got, pil, atol=2e-6)
    # The alternatives are far off on these data: nearest, grids without half-pixel
    # centres (s = j n_in / n_out, and align-corners s = j (n_in - 1) / (n_out - 1)),
    # and for bicubic the replicated-edge convention (different near the borders).
    nearest = np.asarray(superres.upsample(jnp.asarray(x), size, "nearest"))
    assert np.abs(nearest - ref).max() > 0.1
    for grid in (lambda j, n_in, n_out: j * n_in / n_out,
                 lambda j, n_in, n_out: j * (n_in - 1) / (n_out - 1)):
      def weights(n_in, n_out, grid=grid):
        s = grid(np.arange(n_out), n_in, n_out)
        w = kernel(s[:, None] - np.arange(n_in)[None, :])
        return w / w.sum(axis=1, keepdims=True)
      other = np.einsum("yh,bhwc,xw->byxc", weights(5, size), x.astype(np.float64),
                        weights(7, size))
      assert np.abs(other - ref).max() > 0.1
  if method == "bicubic":
    s = (np.arange(12) + 0.5) * 5 / 12 - 0.5
    taps = np.floor(s)[:, None] + np.arange(-1, 3)[None, :]
    rep = np.zeros((12, 5))
    for j in range(12):
      for t in taps[j]:
        rep[j, int(np.clip(t, 0, 4))] += _keys_cubic(s[j] - t)
    assert np.abs(rep - _ref_weights(5, 12, _keys_cubic)).max() > 1e-3


def test_upsample_default_is_bilinear_and_keeps_constants():
  """The default method is bilinear; every method keeps a constant image constant."""
  x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 4, 1)).astype(np.float32)
  np.testing.assert_array_equal(superres.upsample(x, 8), superres.upsample(x, 8, "bilinear"))
  np.testing.assert_allclose(superres.upsample(x, 8), _ref_resize(x, 8, _TRIANGLE), atol=2e-6)
  for method in superres.UPSAMPLE_METHODS:
    np.testing.assert_allclose(superres.upsample(np.full((1, 3, 3, 1), 0.7), 9, method), 0.7,
                               rtol=1e-6)


# ---- Model input, data pairs, config -----------------------------------------------


def _sr_config(data_dir="", **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.data.low_res_size = 8
  config.model.low_res_channels = 1
  return apply_overrides(config, **overrides)


def test_conditioning_image_reaches_the_model_at_the_right_size_and_channels(monkeypatch):
  from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top
  config = _sr_config(model__low_res_upsample="nearest", model__ch_mult=(1,),
                      model__attn_resolutions=())  # one level: quick to compile
  model = models.create_model(config.model, 1)
  params = jax.jit(lambda: builders.init_params(model, config, jax.random.key(0)))()
  # conv_in sees x and the upsampled low-res image, after the 2x2 space-to-depth stem.
  assert params["conv_in"]["kernel"].shape == (3, 3, 2 * 2 * (1 + 1), 32)
  seen = []
  original = unet.space_to_depth
  monkeypatch.setattr(unet, "space_to_depth", lambda h, p: seen.append(h) or original(h, p))
  x = jnp.zeros((2, 16, 16, 1))
  low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  cond = {"low_res": low, "aug_level": jnp.zeros((2,), jnp.int32)}
  out = model.apply({"params": params}, x, jnp.zeros((2,), jnp.int32), cond, train=False)
  assert out.shape == (2, 16, 16, 1)
  (h,) = seen
  assert h.shape == (2, 16, 16, 2)  # [x, upsampled low_res] on the channel axis
  np.testing.assert_array_equal(np.asarray(h[..., 1:]),
                                np.repeat(np.repeat(np.asarray(low), 2, 1), 2, 2))
  # The low-res image and the level both change the output.
  f = _perturbed_model_fn(config.model, config, x)
  base = f(cond)
  assert np.abs(f({**cond, "low_res": -low}) - base).max() > 1e-4
  # In this one-level, 32-channel U-Net the DDPM block's GroupNorm(32) removes the
  # embedding again (layers.ResBlock): the level cannot reach the output ...
  assert np.abs(f({**cond, "aug_level": jnp.full((2,), 50)}) - base).max() < 1e-4
  # ... unless the embedding enters after the norm (scale_shift_norm).
  f = _perturbed_model_fn({**config.model, "scale_shift_norm": True}, config, x)
  assert np.abs(f({**cond, "aug_level": jnp.full((2,), 50)}) - f(cond)).max() > 1e-3


def _perturbed_model_fn(model_config, config, x):
  """cond -> output of a model whose parameters are all perturbed: the last conv of
  each ResBlock and conv_out start at zero (as DDPM), which would hide the level."""
  model = models.create_model(model_config, 1)
  params = perturbed_params(model, config)
  t = jnp.zeros((x.shape[0],), jnp.int32)
  apply = jax.jit(lambda c: model.apply({"params": params}, x, t, c, train=False))
  return lambda c: np.asarray(apply(c))


def test_wrong_low_res_inputs_are_clear_errors():
  config = _sr_config()
  model = models.create_model(config.model, 1)
  x, t = jnp.zeros((2, 16, 16, 1)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"needs cond\['low_res'\]"):
    model.init(jax.random.key(0), x, t, None, train=False)
  with pytest.raises(ValueError, match=r"cond\['low_res'\] must have shape"):
    model.init(jax.random.key(0), x, t, {"low_res": jnp.zeros((2, 8, 8, 3)),
                                         "aug_level": t}, train=False)
  with pytest.raises(ValueError, match="low_res_channels"):
    config_lib.validate(_sr_config(model__low_res_channels=0))
  with pytest.raises(ValueError, match="must lie in"):
    config_lib.validate(_sr_config(data__low_res_size=16))
  with pytest.raises(ValueError, match="noise_aug_max"):
    config_lib.validate(_sr_config(superres__noise_aug_max=2.0))


def test_pipeline_gives_antialiased_low_res_pairs_flipped_together(digits_dir):
  config = _sr_config(digits_dir, data__random_flip=True)
  it = input_pipeline.create_train_iterator(config.data, 32, 0)
  batch = next(it)
  hi, lo = batch["image"], batch["low_res"]
  assert hi.shape == (32, 16, 16, 1) and lo.shape == (32, 8, 8, 1)
  # 16 -> 8 is an exact 2x2 box average (PIL reduce) of the uint8 image; digits are
  # not mirror-symmetric, so a flip of one half of the pair alone would break this.
  hi_u8 = np.round((hi + 1) * 127.5)
  box = hi_u8.reshape(32, 8, 2, 8, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose((lo + 1) * 127.5, np.round(box), atol=0.51)
  unflipped = _sr_config(digits_dir)
  plain = next(input_pipeline.create_train_iterator(unflipped.data, 32, 0))["image"]
  assert 0 < np.mean(np.any(plain != hi, axis=(1, 2, 3))) < 1  # some were flipped


def test_train_cond_levels_stay_in_range_and_blur_applies():
  config = _sr_config(superres__noise_aug_max=0.3, superres__blur_prob=1.0)
  schedule = builders.make_schedule(config)  # T = 100: levels in {0, ..., 30}
  low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (512, 8, 8, 1)), jnp.float32)
  batch = {"image": jnp.zeros((512, 16, 16, 1)), "label": jnp.zeros((512,), jnp.int32),
           "low_res": low}
  cond = Conditioning(config).train(batch, jax.random.key(3), schedule)
  level = np.asarray(cond["aug_level"])
  assert level.min() == 0 and level.max() == 30 and len(np.unique(level)) == 31
  clean = level == 0  # level 0: only the blur acted, which lowers the variance
  assert clean.any()
  assert np.asarray(cond["low_res"])[clean].std() < 0.9 * np.asarray(low)[clean].std()


# ---- Training, cascade pipeline ----------------------------------------------------


def _stage(data_dir, size, low_res, **overrides):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.data.image_size = size
  config.model.patch_size = 1 if size == 8 else 2
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()  # one level: quick compiles
  config.model.num_classes, config.conditioning.type = 10, "class"
  if low_res:
    config.data.low_res_size, config.model.low_res_channels = low_res, 1
  t = config.training
  t.num_train_steps = t.checkpoint_every_steps = 2
  t.sample_every_steps = 0
  config.sample.num_steps = 3
  return apply_overrides(config, **overrides)


@pytest.fixture(scope="module")
def two_stages(digits_dir, tmp_path_factory):
  """An 8x8 class-conditional base and an 8 -> 16 upsampler, two steps each."""
  dirs = []
  for name, cfg in (("base", _stage(digits_dir, 8, 0)),
                    ("sr", _stage(digits_dir, 16, 8, superres__blur_prob=0.5))):
    dirs.append(str(tmp_path_factory.mktemp(name)))
    state = train.train_and_evaluate(cfg, dirs[-1])
    assert int(state.step) == 2
  return dirs


def _record_generate(monkeypatch):
  """Records the keyword arguments of every generate() call a cascade makes."""
  calls, original = [], generation.generate

  def recording(*args, **kwargs):
    calls.append(kwargs["cond"])
    return original(*args, **kwargs)
  monkeypatch.setattr(cascade.generation, "generate", recording)
  return calls


def test_cascade_carries_labels_through_every_stage(two_stages, tmp_path, monkeypatch):
  config = cascade_config.get_config(",".join(two_stages))
  config.cascade.num_samples, config.cascade.batch_size = 12, 8
  config.cascade.labels = "3,7"
  calls = _record_generate(monkeypatch)
  paths = cascade.sample_cascade(config, str(tmp_path))
  for call in calls:  # both stages are class-conditional: both get the labels
    np.testing.assert_array_equal(call["label"], [3, 7] * 6)
  assert "low_res" not in calls[0] and calls[1]["low_res"].shape == (12, 8, 8, 1)
  base, sr = (np.load(p) for p in paths)
  assert base["arr_0"].shape == (12, 8, 8, 1) and sr["arr_0"].shape == (12, 16, 16, 1)
  want = np.array([3, 7] * 6)
  np.testing.assert_array_equal(base["labels"], want)
  np.testing.assert_array_equal(sr["labels"], want)
  assert os.path.exists(os.path.join(tmp_path, "samples", "cascade.png"))


def test_stages_that_do_not_chain_are_a_clear_error(two_stages):
  config = cascade_config.get_config(",".join(two_stages))
  config.stage_1.data.low_res_size = 4
  with pytest.raises(ValueError, match="do not chain: stage_0 makes 8x8x1 images, but "
                     "stage_1 upsamples 4x4x1"):
    cascade.check_chain(cascade.stages(config))
  swapped = cascade_config.get_config(",".join(two_stages[::-1]))
  with pytest.raises(ValueError, match="first stage must be a base model"):
    cascade.check_chain(cascade.stages(swapped))


def test_sr_sampler_needs_low_res_of_the_right_shape(two_stages):
  config = cascade_config.get_config(",".join(two_stages)).stage_1
  mesh = parallel.make_mesh()
  model = models.create_model(config.model, 1)
  fn = generation.make_sample_fn(model, builders.make_schedule(config), config, 4, mesh)
  params = builders.init_params(model, config, jax.random.key(0))
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match=r"cond lacks \['low_res'\]"):
    fn(params, jax.random.key(0), {"label": labels})
  with pytest.raises(ValueError, match=r"low_res must have shape \(4, 8, 8, 1\)"):
    fn(params, jax.random.key(0), {"label": labels, "low_res": np.zeros((4, 16, 16, 1))})
  with pytest.raises(ValueError, match="needs low_res.*in a cascade"):
    Conditioning(config).request(4)


# ---- PSNR / SSIM ---------------------------------------------------------------------


def test_psnr_closed_form():
  a = np.full((2, 8, 8, 3), 100, np.uint8)
  b = a.copy()
  b[1] += 5
  np.testing.assert_allclose(image_metrics.psnr(a, b), [np.inf, 10 * np.log10(255**2 / 25)])


def _ssim_naive(a, b):
  """SSIM by explicit 11x11 windows (an independent, slow reference)."""
  x = np.arange(-5, 6)
  g = np.exp(-0.5 * (x / 1.5) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  vals = []
  for ch in range(a.shape[-1]):
    for i in range(a.shape[0] - 10):
      for j in range(a.shape[1] - 10):
        pa, pb = a[i:i + 11, j:j + 11, ch], b[i:i + 11, j:j + 11, ch]
        ma, mb = (w * pa).sum(), (w * pb).sum()
        va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
        cov = (w * (pa - ma) * (pb - mb)).sum()
        vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_matches_a_windowed_reference():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 16, 14, 3)).astype(np.uint8)
  b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
  got = image_metrics.ssim(a, b)
  want = [_ssim_naive(a[i].astype(float), b[i].astype(float)) for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-9)
  np.testing.assert_allclose(image_metrics.ssim(a, a), 1.0)
  assert got.max() < 0.97
  unrelated = rng.integers(0, 256, a.shape).astype(np.uint8)
  assert np.abs(image_metrics.ssim(a, unrelated)).max() < 0.1
  with pytest.raises(ValueError, match="11x11"):
    image_metrics.ssim(a[:, :8, :8], b[:, :8, :8])


def test_checkpoints_saved_before_the_new_model_fields_still_match(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  checkpointing.save_config(str(tmp_path), config)
  path = tmp_path / checkpointing.CONFIG_FILE
  saved = json.loads(path.read_text())
  for field in ("scale_shift_norm", "low_res_channels", "low_res_upsample", "text_width"):
    del saved["model"][field]  # as a run saved before these fields existed
  path.write_text(json.dumps(saved))
  checkpointing.check_compatible(str(tmp_path), config)  # defaults: the same model
  config.model.text_width = 64  # unused by a plain U-Net
  checkpointing.check_compatible(str(tmp_path), config)
  config.model.scale_shift_norm = True
  with pytest.raises(checkpointing.CheckpointError, match="model.scale_shift_norm"):
    checkpointing.check_compatible(str(tmp_path), config)
