"""The DALL-E 2 prior network (`PriorTransformer`): shapes, masking, causality, params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.prior import NUM_EXTRA, PriorTransformer, attention_mask

B, L, D, TW = 3, 7, 8, 6
FIELDS = dict(embed_dim=D, text_width=TW, max_text_length=10, width=16, num_layers=2,
              num_heads=2)
LENGTHS = (4, 2, 4)  # real tokens per row; the rest is padding


def _inputs(seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (B, D))
  t = jnp.array([3, 250, 999], jnp.int32)
  cond = dict(text_tokens=jax.random.normal(ks[1], (B, L, TW)),
              text_mask=jnp.arange(L)[None, :] < jnp.array(LENGTHS)[:, None],
              text_embed=jax.random.normal(ks[2], (B, D)))
  return x, t, cond


@pytest.fixture(scope="module")
def setup():
  model = PriorTransformer(**FIELDS)
  x, t, cond = _inputs()
  params = jax.jit(lambda: model.init(jax.random.key(0), x, t, cond)["params"])()
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, train=False))
  return model, params, apply, (x, t, cond)


def _hidden(model, params, x, t, cond):
  """Every block's output `[num_layers, B, L + 4, width]`, via capture_intermediates."""
  _, state = model.apply({"params": params}, x, t, cond, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  return np.stack([np.asarray(inter[f"block_{i}"]["__call__"][0])
                   for i in range(model.num_layers)])


def test_output_shape_dtype_finite(setup):
  _, params, apply, (x, t, cond) = setup
  out = apply(params, x, t, cond)
  assert out.shape == (B, D) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  empty = dict(cond, text_mask=jnp.zeros((B, L), bool))  # a null caption
  assert np.isfinite(np.asarray(apply(params, x, t, empty))).all()


def test_attention_mask_is_causal_and_hides_padding():
  mask = np.array([[True, True, False], [False, False, False]])
  got = np.asarray(attention_mask(jnp.asarray(mask)))
  s = 3 + NUM_EXTRA
  keys = np.concatenate([mask, np.ones((2, NUM_EXTRA), bool)], axis=1)
  want = np.array([[[j <= i and keys[b, j] for j in range(s)] for i in range(s)]
                   for b in range(2)])
  assert got.shape == (2, 1, s, s)
  np.testing.assert_array_equal(got[:, 0], want)


def test_padding_is_never_seen(setup):
  _, params, apply, (x, t, cond) = setup
  out = np.asarray(apply(params, x, t, cond))
  junk = jnp.where(cond["text_mask"][..., None], cond["text_tokens"], 123.0)
  np.testing.assert_array_equal(np.asarray(apply(params, x, t, dict(cond, text_tokens=junk))),
                                out)
  # Padding length does not matter: cut the batch to its longest caption.
  short = {k: v[:, :max(LENGTHS)] for k, v in cond.items() if k != "text_embed"}
  short["text_embed"] = cond["text_embed"]
  np.testing.assert_allclose(np.asarray(apply(params, x, t, short)), out, atol=1e-5)
  # A real token does matter (row 1 has 2 real tokens: change its second).
  real = cond["text_tokens"].at[1, 1].add(1.0)
  diff = np.abs(np.asarray(apply(params, x, t, dict(cond, text_tokens=real))) - out)
  assert diff[1].max() > 1e-3
  np.testing.assert_array_equal(diff[[0, 2]], 0.0)  # other rows are independent


def test_attention_is_causal(setup):
  model, params, _, (x, t, cond) = setup
  base = _hidden(model, params, x, t, cond)
  assert base.shape == (FIELDS["num_layers"], B, L + NUM_EXTRA, FIELDS["width"])
  ix = L + 2  # position of the noisy image embedding
  moved = _hidden(model, params, x + 1.0, t, cond)
  np.testing.assert_array_equal(moved[:, :, :ix], base[:, :, :ix])  # text, text embed, t
  assert np.abs(moved[:, :, ix:] - base[:, :, ix:]).max(axis=-1).min() > 1e-3
  # A text token reaches only itself and later positions.
  tok = _hidden(model, params, x, t, dict(cond, text_tokens=cond["text_tokens"].at[:, 1].add(1.)))
  np.testing.assert_array_equal(tok[:, :, :1], base[:, :, :1])
  assert np.abs(tok[:, :, -1] - base[:, :, -1]).max(axis=-1).min() > 1e-3


def test_t_and_x_matter(setup):
  _, params, apply, (x, t, cond) = setup
  out = np.asarray(apply(params, x, t, cond))
  for other in (apply(params, x, t + 1, cond), apply(params, 0.9 * x, t, cond),
                apply(params, x, t, dict(cond, text_embed=-cond["text_embed"]))):
    assert np.abs(np.asarray(other) - out).max(axis=-1).min() > 1e-3  # every row changes


def test_jit_gradient_step_and_dropout(setup):
  _, params, apply, (x, t, cond) = setup
  full = dict(cond, text_mask=jnp.ones((B, L), bool))  # every parameter then has a use
  target = jax.random.normal(jax.random.key(5), (B, D))
  loss = jax.jit(lambda p: jnp.mean((apply(p, x, t, full) - target) ** 2))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
  assert float(loss(stepped)) < float(value)
  drop = PriorTransformer(**FIELDS, dropout=0.5)
  train = lambda k: drop.apply({"params": params}, x, t, cond, train=True, rngs={"dropout": k})
  a, b = jax.jit(train)(jax.random.key(1)), jax.jit(train)(jax.random.key(2))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def _expected_params(embed_dim, text_width, max_text_length, width, num_layers, **_):
  w, d = width, embed_dim
  dense = lambda n_in, n_out: n_in * n_out + n_out  # kernel + bias
  block = (2 * w + 4 * dense(w, w)  # ln1; attention q, k, v, out (heads * head_dim = w)
           + 2 * w + dense(w, 4 * w) + dense(4 * w, w))  # ln2; MLP
  return (dense(text_width, w) + dense(d, w) + dense(d, w)  # text tokens, text embed, x
          + 2 * dense(w, w)  # timestep MLP on a width-w sinusoid
          + (max_text_length + NUM_EXTRA) * w + w  # position embeddings, final query
          + num_layers * block + 2 * w + dense(w, d))  # blocks, final LN, output


@pytest.mark.parametrize("fields", [FIELDS, {}], ids=["small", "defaults"])
def test_parameter_count(fields):
  model = PriorTransformer(**fields)
  m = model
  x, t = jnp.zeros((2, m.embed_dim)), jnp.zeros((2,), jnp.int32)
  cond = dict(text_tokens=jnp.zeros((2, 3, m.text_width)), text_mask=jnp.ones((2, 3), bool),
              text_embed=jnp.zeros((2, m.embed_dim)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))["params"]
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  fields_all = {f: getattr(m, f) for f in ("embed_dim", "text_width", "max_text_length",
                                           "width", "num_layers")}
  assert count == _expected_params(**fields_all)
  if not fields:
    assert count == 869_440  # the blocks (12 W^2 + 13 W each) are 793,088 of it


@pytest.mark.parametrize("change, match", [
    (lambda x, t, c: (x[:, :-1], t, c), "x must be"),
    (lambda x, t, c: (x, t[:2], c), "t must be"),
    (lambda x, t, c: (x, t, dict(c, text_tokens=c["text_tokens"][..., :-1])), "text_tokens"),
    (lambda x, t, c: (x, t, dict(c, text_tokens=jnp.zeros((B, 11, TW)),
                                 text_mask=jnp.ones((B, 11), bool))), "L<=10"),
    (lambda x, t, c: (x, t, dict(c, text_mask=c["text_mask"][:, :-1])), "text_mask"),
    (lambda x, t, c: (x, t, dict(c, text_mask=c["text_mask"].astype(jnp.int32))), "bool"),
    (lambda x, t, c: (x, t, dict(c, text_embed=c["text_embed"][:2])), "text_embed"),
    (lambda x, t, c: (x, t, {k: v for k, v in c.items() if k != "text_embed"}), "cond keys"),
])
def test_bad_shapes_raise(setup, change, match):
  model, params, _, inputs = setup
  with pytest.raises(ValueError, match=match):
    model.apply({"params": params}, *change(*inputs))


def test_bad_fields_raise():
  x, t, cond = _inputs()
  with pytest.raises(ValueError, match="not divisible"):
    PriorTransformer(**dict(FIELDS, num_heads=3)).init(jax.random.key(0), x, t, cond)


def test_bfloat16_compute_gives_float32_output(setup):
  _, params, apply, (x, t, cond) = setup
  model = PriorTransformer(**FIELDS, dtype=jnp.bfloat16)
  out = jax.jit(lambda p: model.apply({"params": p}, x, t, cond))(params)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  # bfloat16 has an 8-bit mantissa: agree with float32 to a few percent of the scale.
  ref = np.asarray(apply(params, x, t, cond))
  assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max() + 0.05
