"""DDPM's TensorFlow checkpoints (convert/ddpm_tf.py) against the TF network itself.

`_ddpm_tf_unet` below is the official `diffusion_tf/models/unet.py` written again
for TF2's v1 graph mode (tf.contrib's group_norm replaced by the same computation:
32 groups, epsilon 1e-6, `gamma`/`beta` variables in the layer's scope). A small
instance is run in TensorFlow and saved with `tf.train.Saver` beside its
ExponentialMovingAverage copies, as the paper's training did; the import must give
the same outputs from this project's U-Net.
"""
import numpy as np
import pytest
import tensorflow as tf

from diffusion_jax import builders, checkpointing
from diffusion_jax.convert import ddpm_tf, workdir_io
from diffusion_jax.convert.diffusers_unet import ConversionError

tf1 = tf.compat.v1
MODEL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0,
             patch_size=1, num_heads=1, head_dim=0)
SIZE = 16


def _var(name, shape, rng):
  init = rng.uniform(-1, 1, shape) * (np.sqrt(3.0 / np.prod(shape[:-1])) if len(shape) > 1
                                      else 0.1)
  if name == "gamma":
    init = 1.0 + 0.2 * rng.uniform(-1, 1, shape)
  return tf1.get_variable(name, initializer=tf.constant(init, tf.float32))


def _layer(x, name, out, rng, size=3, stride=1):
  with tf1.variable_scope(name):
    if size == 0:  # nin: a [in, out] kernel on the last axis
      return tf.einsum("bhwc,cd->bhwd", x, _var("W", [int(x.shape[-1]), out], rng)) + _var(
          "b", [out], rng)
    w = _var("W", [size, size, int(x.shape[-1]), out], rng)
    return tf.nn.conv2d(x, w, stride, "SAME") + _var("b", [out], rng)


def _dense(x, name, out, rng):
  with tf1.variable_scope(name):
    return tf.matmul(x, _var("W", [int(x.shape[-1]), out], rng)) + _var("b", [out], rng)


def _norm(x, name, rng):
  with tf1.variable_scope(name):
    b, h, w, c = x.shape
    g = tf.reshape(x, [b, h, w, 32, c // 32])
    mean, var = tf.nn.moments(g, [1, 2, 4], keepdims=True)
    g = (g - mean) * tf.math.rsqrt(var + 1e-6)
    return tf.reshape(g, [b, h, w, c]) * _var("gamma", [c], rng) + _var("beta", [c], rng)


def _resblock(x, temb, name, out, rng):
  with tf1.variable_scope(name):
    h = _layer(tf.nn.swish(_norm(x, "norm1", rng)), "conv1", out, rng)
    h += _dense(tf.nn.swish(temb), "temb_proj", out, rng)[:, None, None, :]
    h = _layer(tf.nn.swish(_norm(h, "norm2", rng)), "conv2", out, rng)
    if x.shape[-1] != out:
      x = _layer(x, "nin_shortcut", out, rng, size=0)
    return x + h


def _attn(x, name, rng):
  b, hgt, wid, c = x.shape
  with tf1.variable_scope(name):
    h = _norm(x, "norm", rng)
    q, k, v = (_layer(h, n, c, rng, size=0) for n in "qkv")
    w = tf.einsum("bhwc,bHWc->bhwHW", q, k) * (int(c) ** -0.5)
    w = tf.reshape(tf.nn.softmax(tf.reshape(w, [b, hgt, wid, hgt * wid]), -1),
                   [b, hgt, wid, hgt, wid])
    return x + _layer(tf.einsum("bhwHW,bHWc->bhwc", w, v), "proj_out", c, rng, size=0)


def _timestep_embedding(t, dim):
  half = dim // 2
  freqs = tf.exp(tf.range(half, dtype=tf.float32) * -(np.log(10000) / (half - 1)))
  args = tf.cast(t, tf.float32)[:, None] * freqs[None]
  return tf.concat([tf.sin(args), tf.cos(args)], axis=1)


def _ddpm_tf_unet(x, t, rng, ch, ch_mult, num_res_blocks, attn_resolutions, **_):
  with tf1.variable_scope("model"):
    with tf1.variable_scope("temb"):
      temb = _dense(_timestep_embedding(t, ch), "dense0", 4 * ch, rng)
      temb = _dense(tf.nn.swish(temb), "dense1", 4 * ch, rng)
    hs = [_layer(x, "conv_in", ch, rng)]
    for i, mult in enumerate(ch_mult):
      with tf1.variable_scope(f"down_{i}"):
        for j in range(num_res_blocks):
          h = _resblock(hs[-1], temb, f"block_{j}", ch * mult, rng)
          if h.shape[1] in attn_resolutions:
            h = _attn(h, f"attn_{j}", rng)
          hs.append(h)
        if i != len(ch_mult) - 1:
          with tf1.variable_scope("downsample"):
            hs.append(_layer(hs[-1], "conv", int(hs[-1].shape[-1]), rng, stride=2))
    with tf1.variable_scope("mid"):
      h = _resblock(hs[-1], temb, "block_1", int(hs[-1].shape[-1]), rng)
      h = _resblock(_attn(h, "attn_1", rng), temb, "block_2", int(h.shape[-1]), rng)
    for i in reversed(range(len(ch_mult))):
      with tf1.variable_scope(f"up_{i}"):
        for j in range(num_res_blocks + 1):
          h = _resblock(tf.concat([h, hs.pop()], -1), temb, f"block_{j}", ch * ch_mult[i], rng)
          if h.shape[1] in attn_resolutions:
            h = _attn(h, f"attn_{j}", rng)
        if i != 0:
          with tf1.variable_scope("upsample"):
            _, hh, ww, c = h.shape
            h = tf1.image.resize_nearest_neighbor(h, [2 * hh, 2 * ww], align_corners=True)
            h = _layer(h, "conv", int(c), rng)
    h = tf.nn.swish(_norm(h, "norm_out", rng))
    return _layer(h, "conv_out", int(x.shape[-1]), rng)


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
  """(checkpoint prefix, x, t, outputs with the raw and with the EMA weights)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, SIZE, SIZE, 3)).astype(np.float32)
  t = np.array([0, 500, 999], np.int32)
  graph = tf.Graph()
  with graph.as_default():
    out = _ddpm_tf_unet(tf.constant(x), tf.constant(t), rng, **MODEL)
    variables = tf1.trainable_variables()
    step = tf1.train.get_or_create_global_step()
    ema = tf1.train.ExponentialMovingAverage(0.9999)
    ema.apply(variables)
    shadows = [ema.average(v) for v in variables]
    with tf1.Session() as sess:
      sess.run(tf1.global_variables_initializer())
      raw = sess.run(out)
      # EMA copies that differ from the weights, then the network run with them.
      for s in shadows:
        s.load(sess.run(s) * 0.9 + 0.01, sess)
      values = sess.run(variables)
      for v, s in zip(variables, shadows):
        v.load(sess.run(s), sess)
      with_ema = sess.run(out)
      for v, value in zip(variables, values):
        v.load(value, sess)
      step.load(790000, sess)
      prefix = str(tmp_path_factory.mktemp("tf") / "model.ckpt-790000")
      tf1.train.Saver().save(sess, prefix, write_meta_graph=False)
  return prefix, x, t, raw, with_ema


def _config():
  return workdir_io.build_config(None, dict(
      model=MODEL, data=dict(image_size=SIZE, channels=3, num_classes=0)))


@pytest.mark.parametrize("ema", [True, False])
def test_tf_checkpoint_reproduces_the_tf_network(tf_checkpoint, tmp_path, ema):
  prefix, x, t, raw, with_ema = tf_checkpoint
  workdir = str(tmp_path / "w")
  ddpm_tf.import_tf(prefix, workdir, _config(), ema=ema)
  config = checkpointing.load_config(workdir)
  model, params, _, _ = builders.restore_ema(config, workdir)
  out = np.asarray(model.apply({"params": params}, x, t, None, train=False))
  want = with_ema if ema else raw
  assert np.abs(out - want).max() / np.abs(want).max() <= 1e-4
  assert np.abs(with_ema - raw).max() > 0.1 * np.abs(raw).max()  # the two do differ
  import json, os  # pylint: disable=g-import-not-at-top,multiple-imports
  with open(os.path.join(workdir, workdir_io.PROVENANCE_FILE)) as f:
    assert json.load(f)["global_step"] == 790000


def test_tf_checkpoint_of_another_model_is_refused(tf_checkpoint, tmp_path):
  prefix = tf_checkpoint[0]
  wider = _config()
  wider.unlock()
  wider.model.num_res_blocks = 1  # the checkpoint has two per level
  with pytest.raises(ConversionError, match=r"unused: model/down_0/block_1/"):
    ddpm_tf.import_tf(prefix, str(tmp_path / "w"), wider)
  with pytest.raises(ConversionError, match="cannot read the TensorFlow checkpoint"):
    ddpm_tf.import_tf(str(tmp_path / "nothing"), str(tmp_path / "w2"), _config())
  class_model = _config()
  class_model.unlock()
  class_model.model.num_classes = 10
  with pytest.raises(ConversionError, match="plain U-Net"):
    ddpm_tf.import_tf(prefix, str(tmp_path / "w3"), class_model)


def test_tf_names_follow_the_official_scopes():
  assert ddpm_tf.tf_name(("down_1_attn_0", "q", "kernel")) == "model/down_1/attn_0/q/W"
  assert ddpm_tf.tf_name(("mid_block_2", "norm2", "scale")) == "model/mid/block_2/norm2/gamma"
  assert ddpm_tf.tf_name(("up_3_upsample", "conv", "bias")) == "model/up_3/upsample/conv/b"
  assert ddpm_tf.tf_name(("norm_out", "bias")) == "model/norm_out/beta"
  assert ddpm_tf.tf_name(("temb", "dense1", "kernel")) == "model/temb/dense1/W"
