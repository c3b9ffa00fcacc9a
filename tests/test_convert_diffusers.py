"""diffusers UNet2DModel folders in and out (diffusion_jax/convert), against torch records.

`tests/data/make_diffusers_reference.py` (a torch-only venv) recorded diffusers
U-Nets of the DDPM CIFAR-10 and 256x256 layouts at a quarter of the width, plus a
multi-head variant with attention at every level: their config.json, state-dict layout and outputs.
The weights are drawn again here from the layout with numpy, written as the
safetensors file diffusers would write, imported, and run.
"""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import celebahq256, cifar10
from configs import test as test_config
from diffusion_jax import builders, checkpointing, evaluate, models
from diffusion_jax.convert import diffusers as diffusers_io
from diffusion_jax.convert import diffusers_scheduler, diffusers_unet
from diffusion_jax.convert.diffusers_unet import ConversionError

DATA = pathlib.Path(__file__).parent / "data" / "diffusers_unet"
ROOT = pathlib.Path(__file__).parent.parent
LAYOUTS = ("cifar10_layout", "ddpm256_layout", "heads_all_levels")


def _reference_module():
  spec = importlib.util.spec_from_file_location(
      "make_diffusers_reference", DATA.parent / "make_diffusers_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # imports only numpy at load
  return module


REF = _reference_module()


def _layout(name):
  with open(DATA / name / "layout.json") as f:
    return json.load(f)


def _write_folder(root, name, legacy=False):
  """A diffusers pipeline folder (unet/ + scheduler/) for recorded model `name`."""
  rec = _layout(name)
  state = REF.random_state(rec["layout"], rec["seed"])
  if legacy:  # the attention names of checkpoints saved by diffusers < 0.14
    for new, old in diffusers_unet._LEGACY.items():  # pylint: disable=protected-access
      state = {k.replace(new, old): v for k, v in state.items()}
  unet = pathlib.Path(root) / name / "unet"
  unet.mkdir(parents=True)
  save_file(state, str(unet / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
  shutil.copy(DATA / name / "config.json", unet / "config.json")
  (unet.parent / "scheduler").mkdir()
  shutil.copy(DATA / "scheduler_config.json", unet.parent / "scheduler" / "scheduler_config.json")
  return str(unet.parent), state


def _run(workdir, x_nchw, t):
  config = checkpointing.load_config(workdir)
  model, params, _, _ = builders.restore_ema(config, workdir)
  out = model.apply({"params": params}, x_nchw.transpose(0, 2, 3, 1), t, None, train=False)
  return np.asarray(out).transpose(0, 3, 1, 2), params


@pytest.mark.parametrize("name", LAYOUTS)
def test_import_reproduces_the_diffusers_outputs(name, tmp_path):
  src, state = _write_folder(tmp_path, name)
  workdir = str(tmp_path / "w")
  config = diffusers_io.import_diffusers(src, workdir)
  ref = np.load(DATA / name / "torch.npz")
  out, params = _run(workdir, ref["x"], ref["t"].astype(np.int32))
  assert sum(a.size for a in jax.tree.leaves(params)) == sum(a.size for a in state.values())
  err = np.abs(out - ref["out"]).max() / np.abs(ref["out"]).max()
  assert err <= 1e-4, f"{name}: relative error {err:.2e}"
  # The import is the published pipeline's: schedule and sampling from its scheduler.
  assert (config.diffusion.schedule, config.diffusion.num_timesteps,
          config.diffusion.prediction) == ("linear", 1000, "eps")
  assert config.sample.variance == "fixed_large" and config.sample.thresholding == "static"
  with open(os.path.join(workdir, "imported_from.json")) as f:
    assert json.load(f)["num_tensors"] == len(state)


def test_legacy_attention_names_give_the_same_parameters(tmp_path):
  """The published DDPM folders name attention query/key/value/proj_attn."""
  src, state = _write_folder(tmp_path, "cifar10_layout", legacy=True)
  assert any(".query." in k for k in state) and not any(".to_q." in k for k in state)
  shapes = diffusers_io.param_shapes(diffusers_io.folder_config(src)[0])
  rec = _layout("cifar10_layout")
  new = REF.random_state(rec["layout"], rec["seed"])
  jax.tree.map(np.testing.assert_array_equal,
               diffusers_unet.state_dict_to_params(state, shapes, 4),
               diffusers_unet.state_dict_to_params(new, shapes, 4))


def test_import_export_import_is_exact(tmp_path):
  name = "heads_all_levels"
  src, state = _write_folder(tmp_path, name)
  first, second, dst = (str(tmp_path / d) for d in ("w1", "w2", "exported"))
  diffusers_io.import_diffusers(src, first)
  path = diffusers_io.export_diffusers(first, dst)
  exported = load_file(path)
  assert list(exported) == sorted(state) or set(exported) == set(state)
  for key, value in state.items():  # every tensor back, bit for bit, in torch layout
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(dst, "unet", "config.json")) as f:
    out_cfg = json.load(f)
  with open(DATA / name / "config.json") as f:
    in_cfg = json.load(f)
  assert diffusers_unet.model_fields(out_cfg) == diffusers_unet.model_fields(in_cfg)
  diffusers_io.import_diffusers(dst, second)
  p1 = builders.restore_ema(checkpointing.load_config(first), first)[1]
  p2 = builders.restore_ema(checkpointing.load_config(second), second)[1]
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert os.path.exists(os.path.join(dst, "model_index.json"))


@pytest.mark.parametrize("name,base,count", [("cifar10", cifar10, 35_746_307),
                                             ("ddpm256", celebahq256, 113_673_219)])
def test_full_size_ddpm_layouts_map_one_to_one(name, base, count):
  """The DDPM configs are the published checkpoints' U-Nets, tensor for tensor."""
  with open(DATA / "full_layouts.json") as f:
    full = json.load(f)[name]
  fields = diffusers_unet.model_fields(full["config"])
  config = base.get_config()
  for key, value in fields["model"].items():
    if key != "dropout":  # a training setting; the published configs omit it
      assert config.model[key] == value, key
  model = models.create_model(config.model, 3)
  shapes = jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  mapped = {diffusers_unet.torch_key(tuple(k.key for k in path), len(config.model.ch_mult)):
            diffusers_unet.torch_shape(tuple(k.key for k in path), tuple(leaf.shape))
            for path, leaf in flat}
  assert mapped == {k: tuple(s) for k, s in full["layout"]}
  assert sum(int(np.prod(s)) for s in mapped.values()) == count


BAD_FIELDS = [
    (dict(downsample_padding=1), "downsample_padding"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
    (dict(freq_shift=0), "freq_shift"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(upsample_type="resnet"), "upsample_type"),
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(out_channels=6), "out_channels"),
    (dict(block_out_channels=[32, 48, 64, 64]), "block_out_channels"),
    (dict(up_block_types=["UpBlock2D"] * 4), "attention at down levels"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(sample_size=None), "sample_size"),
    (dict(some_new_option=True), "some_new_option"),
]


@pytest.mark.parametrize("change,needle", BAD_FIELDS)
def test_other_architectures_are_refused_naming_the_field(change, needle):
  with open(DATA / "cifar10_layout" / "config.json") as f:
    cfg = dict(json.load(f), **change)
  with pytest.raises(ConversionError, match=needle):
    diffusers_unet.model_fields(cfg)


def test_weights_that_do_not_match_are_listed(tmp_path):
  src, state = _write_folder(tmp_path, "cifar10_layout")
  shapes = diffusers_io.param_shapes(diffusers_io.folder_config(src)[0])
  broken = dict(state)
  del broken["mid_block.attentions.0.to_q.weight"]
  broken["extra.weight"] = np.zeros(3, np.float32)
  broken["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(ConversionError) as e:
    diffusers_unet.state_dict_to_params(broken, shapes, 4, "x.safetensors")
  msg = str(e.value)
  assert "1 missing: mid_block.attentions.0.to_q.weight" in msg
  assert "1 unused: extra.weight" in msg and "conv_in.weight: [32, 3, 5, 5]" in msg


def test_scheduler_configs_map_or_are_refused():
  with open(DATA / "scheduler_config.json") as f:
    ddpm = json.load(f)
  got = diffusers_scheduler.config_fields(ddpm)
  assert got["diffusion"] == dict(schedule="linear", num_timesteps=1000, prediction="eps")
  cos = diffusers_scheduler.config_fields(dict(ddpm, beta_schedule="squaredcos_cap_v2",
                                               prediction_type="v_prediction"))
  assert cos["diffusion"]["schedule"] == "cosine" and cos["diffusion"]["prediction"] == "v"
  # 4000 steps with DDPM's ends scaled by 1000/T is the project's linear schedule.
  long = diffusers_scheduler.config_fields(dict(ddpm, num_train_timesteps=4000,
                                                beta_start=2.5e-5, beta_end=0.005))
  assert long["diffusion"]["num_timesteps"] == 4000
  for change, needle in [(dict(beta_end=0.012), "beta_end=0.012"),
                         (dict(trained_betas=[0.1] * 1000), "trained_betas"),
                         (dict(variance_type="learned_range"), "variance_type"),
                         (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
                         (dict(beta_schedule="laplace"), "beta_schedule"),
                         (dict(clip_sample_range=2.0), "clip_sample_range")]:
    with pytest.raises(ConversionError, match=needle):
      diffusers_scheduler.config_fields(dict(ddpm, **change))
  back = diffusers_scheduler.scheduler_config(got["diffusion"], got["sample"])
  assert diffusers_scheduler.config_fields(back) == got


def test_export_refuses_models_without_a_diffusers_equivalent():
  config = test_config.get_config()  # patch_size 2, a 16x16 digits U-Net
  with pytest.raises(ConversionError, match="patch_size"):
    diffusers_unet.diffusers_config(config.model.to_dict(), 16, 1)
  model = dict(cifar10.get_config().model.to_dict(), num_classes=10)
  with pytest.raises(ConversionError, match="num_classes=10"):
    diffusers_unet.diffusers_config(model, 32, 3)


def test_import_never_writes_over_a_run(tmp_path):
  src, _ = _write_folder(tmp_path, "heads_all_levels")
  workdir = str(tmp_path / "w")
  diffusers_io.import_diffusers(src, workdir)
  before = sorted(os.listdir(workdir))
  with pytest.raises(ConversionError, match="already holds a run"):
    diffusers_io.import_diffusers(src, workdir)
  assert sorted(os.listdir(workdir)) == before
  with pytest.raises(ConversionError, match="not a diffusers U-Net folder"):
    diffusers_io.import_diffusers(str(tmp_path), str(tmp_path / "w2"))
  os.remove(os.path.join(src, "scheduler", "scheduler_config.json"))
  with pytest.raises(ConversionError, match="--scheduler=PATH"):
    diffusers_io.import_diffusers(src, str(tmp_path / "w3"))


def test_command_line_import_then_sample_and_eval(tmp_path, digits_dir):
  """The README's commands: import, then --mode=sample and --mode=eval, unchanged."""
  src, _ = _write_folder(tmp_path, "heads_all_levels")  # 16x16x1, as the digits
  workdir = str(tmp_path / "w")
  cmd = [sys.executable, "-m", "diffusion_jax.convert", "import-diffusers", f"--src={src}",
         f"--workdir={workdir}", "--config=configs/test.py",
         f"--config.data.data_dir={digits_dir}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  out = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.main", "--mode=sample", f"--workdir={workdir}",
       f"--config=configs/from_workdir.py:{workdir}", "--config.sample.num_samples=8",
       "--config.sample.batch_size=8", "--config.sample.method=ddim",
       "--config.sample.num_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  files = [f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".npz")]
  # The scheduler's "leading" spacing came with the import and names the file.
  assert len(files) == 1 and files[0].startswith("ddim2_step0_seed0_n8"), files
  images = np.load(os.path.join(workdir, "samples", files[0]))["arr_0"]
  assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8
  config = checkpointing.load_config(workdir)
  config.sample.num_steps = 2
  config.eval.update(dict(metrics=("digits_fd",), num_samples=40, batch_size=40))
  report = evaluate.evaluate(config, workdir)  # bits/dim would add 1000 steps per example
  assert report["checkpoint_step"] == 0 and set(report["metrics"]) == {"digits_fd"}
  assert np.isfinite(report["metrics"]["digits_fd"]["frechet_distance"])
