"""U-Net and layers: shapes, DDPM parameter counts, conditioning, precision, remat, errors.

Tiny models only (ch 32) so the file runs in seconds on CPU; the big DDPM models are
counted with jax.eval_shape, which allocates nothing.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffusion_jax.models import MODELS, UNet, create_model, layers

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def init(model, x, t, cond=None):
  """The module's own initialisation (zero-init output layers included)."""
  return jax.jit(lambda k: model.init(k, x, t, cond, train=False))(jax.random.key(0))


def abstract_init(model, x, t, cond=None):
  """Shapes of `init`: traces the model (so every input check runs), compiles nothing."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond, train=False))


def random_variables(model, x, t, cond=None, seed=1):
  """Variables of the right tree and shapes, filled from numpy without compiling.

  Compiling `model.init` costs seconds on XLA:CPU (threefry for every parameter),
  and its zero-initialised output layers would make the output identically 0,
  hiding any effect of the inputs; random parameters avoid both.
  """
  shapes = abstract_init(model, x, t, cond)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, n = path[-1].key, rng.standard_normal(leaf.shape)
    if name == "scale":
      return jnp.asarray(1 + 0.1 * n, leaf.dtype)
    if name == "bias":
      return jnp.asarray(0.1 * n, leaf.dtype)
    fan_in = leaf.shape[0] if name == "embedding" else math.prod(leaf.shape[:-1])
    return jnp.asarray(n / math.sqrt(1 if name == "embedding" else fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def param_names(variables):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}


def count_params(model, shape, cond=None):
  shapes = abstract_init(model, jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32), cond)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


def ddpm_tf_param_count(ch, ch_mult, num_res_blocks, attn_res, size, in_ch, out_ch):
  """Parameter count of hojonathanho/diffusion diffusion_tf/models/unet.py `model`,
  re-derived layer by layer from that code (conv2d/dense/nin with biases, group_norm
  with scale and offset), independent of the Flax module tree."""
  conv = lambda i, o, k=3: k * k * i * o + o
  dense = lambda i, o: i * o + o
  norm = lambda c: 2 * c

  def res(i, o):
    n = norm(i) + conv(i, o) + dense(4 * ch, o) + norm(o) + conv(o, o)
    return n + (dense(i, o) if i != o else 0)  # nin_shortcut

  attn = lambda c: norm(c) + 4 * dense(c, c)  # q, k, v, proj_out
  total = dense(ch, 4 * ch) + dense(4 * ch, 4 * ch) + conv(in_ch, ch)
  skips, cur, s = [ch], ch, size
  for lvl, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total, cur = total + res(cur, ch * m), ch * m
      total += attn(cur) if s in attn_res else 0
      skips.append(cur)
    if lvl != len(ch_mult) - 1:
      total, s = total + conv(cur, cur), s // 2
      skips.append(cur)
  total += 2 * res(cur, cur) + attn(cur)
  for lvl in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total, cur = total + res(cur + skips.pop(), ch * ch_mult[lvl]), ch * ch_mult[lvl]
      total += attn(cur) if s in attn_res else 0
    if lvl != 0:
      total, s = total + conv(cur, cur), s * 2
  return total + norm(cur) + conv(cur, out_ch)


# ---- Shapes and parameter counts --------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_output_shape(size):
  # Shapes are static: eval_shape traces the whole network without running it.
  model = UNet(**TINY, out_channels=2)
  x, t = jnp.ones((2, size, size, 3)), jnp.array([0, 999])
  variables = random_variables(model, x, t)
  out = jax.eval_shape(lambda v: model.apply(v, x, t, train=False), variables)
  assert out.shape == (2, size, size, 2) and out.dtype == jnp.float32


@pytest.mark.parametrize("variant", [
    dict(resblock_updown=True), dict(conv_resample=False), dict(patch_size=2, head_dim=16),
    dict(ch_mult=(1, 2, 2), attn_resolutions=(16, 8), num_heads=2, remat=True),
])
def test_output_shape_variants(variant):
  model = UNet(**{**TINY, **variant})
  x, t = jnp.ones((2, 32, 32, 3)), jnp.array([0, 999])
  out = jax.eval_shape(lambda v: model.apply(v, x, t, train=False),
                       random_variables(model, x, t))
  assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


def test_runs_and_outputs_zero_at_init():
  # conv_out is zero-initialised (as DDPM's 1e-10 scale): the untrained output is 0.
  model = UNet(**{**TINY, "ch_mult": (1,)})  # one level: init compiles faster on CPU
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([0, 999])
  out = jax.jit(lambda v: model.apply(v, x, t, train=False))(init(model, x, t))
  np.testing.assert_array_equal(out, jnp.zeros_like(x))


def test_default_config_model_with_patch_stem():
  config = default.get_config()
  model = create_model(config.model, out_channels=config.data.channels)
  x, t = jax.random.normal(jax.random.key(0), (4, 16, 16, 1)), jnp.arange(4)
  variables = random_variables(model, x, t)
  # patch_size=2: the U-Net sees 8x8x4, so conv_in has 4 input channels.
  assert variables["params"]["conv_in"]["kernel"].shape == (3, 3, 4, 32)
  out = jax.jit(lambda v: model.apply(v, x, t, train=False))(variables)
  assert out.shape == (4, 16, 16, 1) and bool(jnp.all(jnp.isfinite(out)))


def test_space_to_depth_round_trip():
  from diffusion_jax.models.unet import depth_to_space, space_to_depth
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  y = space_to_depth(x, 2)
  assert y.shape == (2, 4, 6, 12)
  np.testing.assert_array_equal(y[0, 1, 2].reshape(2, 2, 3), x[0, 2:4, 4:6])
  np.testing.assert_array_equal(depth_to_space(y, 2), x)


def test_cifar10_param_count_is_ddpm():
  # DDPM CIFAR-10: ch 128, ch_mult (1,2,2,2), 2 res blocks, attention at 16x16.
  n = count_params(UNet(out_channels=3), (1, 32, 32, 3))
  assert n == ddpm_tf_param_count(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3)
  assert n == 35_746_307  # the paper's 35.7M


def test_256_param_count_is_ddpm():
  model = UNet(ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), out_channels=3)
  n = count_params(model, (1, 256, 256, 3))
  assert n == ddpm_tf_param_count(128, (1, 1, 2, 2, 4, 4), 2, (16,), 256, 3, 3)
  assert n == 113_673_219  # the paper's 114M (CelebA-HQ, LSUN)


# ---- Layers -------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 33, 128])
def test_timestep_embedding_matches_float64_reference(dim):
  t = np.array([0, 1, 17, 500, 999])
  half = dim // 2
  freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
  ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  ref = np.pad(ref, ((0, 0), (0, dim % 2)))
  got = layers.timestep_embedding(jnp.asarray(t, jnp.int32), dim)
  # float32 arguments up to 999 rad carry ~6e-5 absolute rounding error.
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-4, rtol=0)


def test_resblock_and_attention_start_as_identity():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  temb = jax.random.normal(jax.random.key(1), (2, 16))
  for block, args in [(layers.ResBlock(32), (x, temb, False)), (layers.SelfAttention(2), (x,))]:
    run = jax.jit(lambda k, b=block, a=args: b.apply(b.init(k, *a), *a))
    out = run(jax.random.key(2))
    np.testing.assert_allclose(out, x, atol=1e-6)


# ---- Conditioning -----------------------------------------------------------------

COND = dict(num_classes=10, cond_vector_dim=8, cross_attn_dim=16, cross_attn_resolutions=(8,))


@pytest.fixture(scope="module")
def cond_model():
  model = UNet(**TINY, **COND, out_channels=3)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t = jnp.array([3, 700])
  cond = dict(label=jnp.array([1, 2]), vector=jnp.ones((2, 8)),
              tokens=jax.random.normal(jax.random.key(3), (2, 5, 16)),
              mask=jnp.array([[True, True, True, False, False]] * 2))
  variables = random_variables(model, x, t, cond)
  apply = jax.jit(lambda c: model.apply(variables, x, t, c, train=False))
  return model, variables, cond, apply


def test_unconditional_model_has_no_conditioning_params():
  x, t = jnp.ones((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
  names = " ".join(param_names(random_variables(UNet(**TINY), x, t)))
  assert "label_emb" not in names and "vector_proj" not in names and "xattn" not in names
  cond = dict(label=t, vector=jnp.ones((1, 8)), tokens=jnp.ones((1, 4, 16)))
  names = " ".join(param_names(random_variables(UNet(**TINY, **COND), x, t, cond)))
  assert "label_emb" in names and "vector_proj" in names
  assert "mid_xattn_1" in names and "down_0_xattn" not in names  # only the 8x8 level


def test_each_conditioning_path_changes_output(cond_model):
  _, _, cond, apply = cond_model
  base = apply(cond)
  changes = dict(label=jnp.array([4, 5]), vector=-jnp.ones((2, 8)),
                 tokens=cond["tokens"].at[:, 0].set(jnp.linspace(-2, 2, 16)))
  for key, value in changes.items():
    diff = jnp.abs(apply({**cond, key: value}) - base).max()
    assert diff > 1e-3, key


def test_null_class_is_the_reserved_last_row(cond_model):
  model, variables, cond, apply = cond_model
  null = {**cond, "label": jnp.full((2,), model.num_classes)}
  assert variables["params"]["label_emb"]["embedding"].shape[0] == model.num_classes + 1
  assert jnp.abs(apply(null) - apply(cond)).max() > 1e-3
  with pytest.raises(ValueError, match="null class"):  # a missing label is an error
    apply({k: v for k, v in cond.items() if k != "label"})


def test_cross_attention_mask_hides_masked_tokens(cond_model):
  _, _, cond, apply = cond_model
  base = apply(cond)
  masked_changed = {**cond, "tokens": cond["tokens"].at[:, 3:].set(100.0)}
  np.testing.assert_allclose(apply(masked_changed), base, atol=1e-6)
  # All tokens masked: the tokens cannot matter at all (the null condition).
  none = {**cond, "mask": jnp.zeros((2, 5), bool)}
  np.testing.assert_allclose(apply({**none, "tokens": -cond["tokens"]}), apply(none), atol=1e-6)
  assert jnp.abs(apply(none) - base).max() > 1e-3


# ---- Precision, remat, compilation -----------------------------------------------------


def test_bfloat16_close_to_float32():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  t = jnp.array([10, 900])
  f32, bf16 = UNet(**TINY), UNet(**TINY, dtype=jnp.bfloat16)
  variables = random_variables(f32, x, t)
  # The same float32 parameters serve both: param_dtype stays float32.
  assert jax.tree.structure(random_variables(bf16, x, t)) == jax.tree.structure(variables)
  out32, out16 = (jax.jit(lambda v, m=m: m.apply(v, x, t, train=False))(variables)
                  for m in (f32, bf16))
  assert out16.dtype == jnp.float32
  # Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%), and the
  # error grows through ~20 layers. Measured over 4 seeds: RMS error 1.1-1.4% of the
  # output's std, worst element 5-9%. Asserted: RMS < 3%, worst < 15%.
  err = out16 - out32
  assert jnp.sqrt(jnp.mean(err**2)) < 0.03 * out32.std()
  assert jnp.abs(err).max() < 0.15 * out32.std()


def test_remat_gives_same_loss_and_grads():
  # One level at 8x8: ResBlocks, self-attention at 8x8 and the mid block, dropout on.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t = jnp.array([10, 900])
  cfg = {**TINY, "ch_mult": (1,), "dropout": 0.1}
  params = random_variables(UNet(**cfg), x, t)["params"]

  def loss_fn(model):
    def loss(params):
      out = model.apply({"params": params}, x, t, train=True,
                        rngs={"dropout": jax.random.key(5)})
      return jnp.mean(out**2)
    return jax.value_and_grad(loss)

  plain, remat = loss_fn(UNet(**cfg)), loss_fn(UNet(**cfg, remat=True))
  # The backward pass recomputes the blocks: jax.checkpoint shows up as remat2.
  assert "remat2" in str(jax.make_jaxpr(remat)(params))
  assert "remat2" not in str(jax.make_jaxpr(plain)(params))
  (l0, g0), (l1, g1) = jax.jit(plain)(params), jax.jit(remat)(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


def test_compiles_once_for_repeated_calls():
  model = UNet(**TINY)
  x, t = jnp.ones((2, 16, 16, 3)), jnp.array([1, 2])
  variables = random_variables(model, x, t)
  traces = []

  @jax.jit
  def fwd(variables, x, t):
    traces.append(1)  # runs only while tracing
    return model.apply(variables, x, t, train=False)

  for i in range(3):
    fwd(variables, x + i, t + i).block_until_ready()
  assert len(traces) == 1 and fwd._cache_size() == 1


# ---- Errors -------------------------------------------------------------------------


def test_bad_image_size():
  model = UNet(**TINY, patch_size=2)
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    abstract_init(model, jnp.ones((1, 18, 18, 3)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(ch=48), "ch=48.*GroupNorm"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(cross_attn_dim=16), "cross_attn_resolutions"),
    (dict(patch_size=0), "patch_size"),
])
def test_bad_fields_fail_at_build(kwargs, match):
  with pytest.raises(ValueError, match=match):
    UNet(**{**TINY, **kwargs})


def test_heads_that_do_not_divide_channels():
  x, t = jnp.ones((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="num_heads=3"):
    abstract_init(UNet(**TINY, num_heads=3), x, t)
  with pytest.raises(ValueError, match="head_dim=24"):
    abstract_init(UNet(**TINY, head_dim=24), x, t)


def test_groupnorm_layer_names_itself():
  with pytest.raises(ValueError, match="'norm1' got 48 channels"):
    block = layers.ResBlock(64)
    block.init(jax.random.key(0), jnp.ones((1, 4, 4, 48)), jnp.ones((1, 8)), False)


def test_cond_mismatches():
  x, t = jnp.ones((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32)
  label = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="num_classes=0"):
    abstract_init(UNet(**TINY), x, t, dict(label=label))
  with pytest.raises(ValueError, match="unknown cond key 'text'"):
    abstract_init(UNet(**TINY), x, t, dict(text=label))
  with pytest.raises(ValueError, match="needs cond\\['label'\\]"):
    abstract_init(UNet(**TINY, num_classes=10), x, t)
  with pytest.raises(ValueError, match="needs cond\\['tokens'\\]"):
    abstract_init(UNet(**TINY, cross_attn_dim=4, cross_attn_resolutions=(8,)), x, t)
  with pytest.raises(ValueError, match="cond\\['vector'\\] must have shape"):
    abstract_init(UNet(**TINY, cond_vector_dim=8), x, t, dict(vector=jnp.ones((2, 4))))
  with pytest.raises(ValueError, match="must be an int array"):
    abstract_init(UNet(**TINY, num_classes=10), x, t, dict(label=label.astype(jnp.float32)))
  with pytest.raises(ValueError, match="match none"):
    abstract_init(UNet(**TINY, cross_attn_dim=4, cross_attn_resolutions=(2,)), x, t,
         dict(tokens=jnp.ones((2, 3, 4))))


def test_create_model_errors():
  config = default.get_config()
  assert isinstance(create_model(config.model, 1), MODELS["unet"])
  bad_name = config.model.copy_and_resolve_references()
  bad_name.name = "resnet"
  with pytest.raises(ValueError, match="valid names: \\['clip', 'prior', 'text_unet', 'unet'\\]"):
    create_model(bad_name, 1)
  with pytest.raises(ValueError, match="cond_vector_dim to model.text_width=128"):
    create_model({**config.model, "name": "text_unet"}, 1)
  with pytest.raises(ValueError, match="'chh'"):
    create_model({**config.model, "chh": 3}, 1)
  with pytest.raises(ValueError, match="model.dtype='fp8'"):
    create_model({**config.model, "dtype": "fp8"}, 1)
  with pytest.raises(ValueError, match="out_channels comes from the data"):
    create_model({**config.model, "out_channels": 3}, 1)
  with pytest.raises(ValueError, match="UNet.ch=40"):
    create_model({**config.model, "ch": 40}, 1)
  model = create_model({**config.model, "ch_mult": [1, 2], "dtype": "bfloat16"}, 3)
  assert model.ch_mult == (1, 2) and model.dtype == jnp.bfloat16
