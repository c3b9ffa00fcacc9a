"""Records diffusers `UNet2DModel`s of the DDPM layouts at reduced width, and their outputs.

Needs torch and diffusers only (no JAX), so it runs in a torch-only venv:

  python tests/data/make_diffusers_reference.py tests/data/diffusers_unet

For each model in MODELS it writes `<name>/config.json` (as `save_config` writes it),
`<name>/layout.json` (the state dict's keys and shapes, in order) and
`<name>/torch.npz` (inputs `x` NCHW, `t`, and the output `out` NCHW). The weights are
not shipped: `random_state(layout, seed)` below draws them from the layout with
numpy alone, so `tests/test_convert_diffusers.py` rebuilds the same tensors, writes
them as a diffusers safetensors file and imports it. It also writes the layouts of
the full-size DDPM CIFAR-10 and 256x256 U-Nets (`full_layouts.json`) and a
DDPMScheduler config as the DDPM folders carry one (`scheduler_config.json`).
"""
import json
import math
import os
import sys

import numpy as np

_CIFAR = dict(  # the DDPM CIFAR-10 checkpoint's config.json, block_out_channels aside
    in_channels=3, out_channels=3, layers_per_block=2, norm_eps=1e-6, norm_num_groups=32,
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    time_embedding_type="positional", act_fn="silu", center_input_sample=False,
    mid_block_scale_factor=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
_256 = dict(_CIFAR, down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
MODELS = {
    # DDPM CIFAR-10 at a quarter of the width (ch 32 instead of 128).
    "cifar10_layout": dict(_CIFAR, sample_size=32, block_out_channels=[32, 64, 64, 64]),
    # DDPM CelebA-HQ / LSUN 256x256 at a quarter width, on 64x64 inputs: attention sits
    # on level 4 as in the full model (16x16 there, 4x4 here).
    "ddpm256_layout": dict(_256, sample_size=64,
                           block_out_channels=[32, 32, 64, 64, 128, 128]),
    # Options beyond DDPM that map too: several heads (attention_head_dim),
    # attention at every level, one channel, two levels.
    "heads_all_levels": dict(_CIFAR, sample_size=16, in_channels=1, out_channels=1,
                             block_out_channels=[32, 64], attention_head_dim=16,
                             down_block_types=["AttnDownBlock2D"] * 2,
                             up_block_types=["AttnUpBlock2D"] * 2),
}
FULL = {"cifar10": dict(_CIFAR, sample_size=32, block_out_channels=[128, 256, 256, 256]),
        "ddpm256": dict(_256, sample_size=256,
                        block_out_channels=[128, 128, 256, 256, 512, 512])}
TIMESTEPS = (0, 417, 999)


def random_state(layout: list, seed: int) -> dict[str, np.ndarray]:
  """Float32 tensors for `layout` ([[key, shape], ...]) from numpy alone.

  Weights are uniform with variance 1/fan_in; norm scales 1 +- 0.2 and biases
  +-0.1, so a norm or bias put in the wrong place changes the output.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in layout:
    u = rng.random(tuple(shape)) * 2.0 - 1.0
    if len(shape) >= 2:
      u = u * math.sqrt(3.0 / int(np.prod(shape[1:])))
    elif key.endswith("weight"):  # GroupNorm scales
      u = 1.0 + 0.2 * u
    else:
      u = 0.1 * u
    out[key] = u.astype(np.float32)
  return out


def inputs(config: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed + 1000)
  size, c = config["sample_size"], config["in_channels"]
  x = rng.standard_normal((len(TIMESTEPS), c, size, size)).astype(np.float32)
  return x, np.array(TIMESTEPS, np.int64)


def layout_of(model) -> list:
  return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def main(out_dir: str) -> None:
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  for seed, (name, config) in enumerate(MODELS.items()):
    model = diffusers.UNet2DModel(**config).eval()
    layout = layout_of(model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           random_state(layout, seed).items()}, strict=True)
    x, t = inputs(config, seed)
    with torch.no_grad():
      out = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    with open(os.path.join(folder, "layout.json"), "w") as f:
      json.dump(dict(seed=seed, layout=layout), f)
    np.savez_compressed(os.path.join(folder, "torch.npz"), x=x, t=t, out=out)
    print(name, sum(int(np.prod(s)) for _, s in layout), "parameters, |out| max",
          float(np.abs(out).max()))
  full = {}
  for name, config in FULL.items():
    with torch.device("meta"):  # shapes only
      layout = layout_of(diffusers.UNet2DModel(**config))
    full[name] = dict(config=config, layout=layout)
    print(name, sum(int(np.prod(s)) for _, s in layout), "parameters")
  with open(os.path.join(out_dir, "full_layouts.json"), "w") as f:
    json.dump(full, f)
  diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=True).save_config(out_dir)
  print("diffusers", diffusers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__),
                                                          "diffusers_unet"))
