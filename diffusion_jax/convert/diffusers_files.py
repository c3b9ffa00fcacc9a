"""Reading and writing diffusers folders: configs and weights, without torch.

A diffusers U-Net folder holds `config.json` and `diffusion_pytorch_model.safetensors`
(or the older `diffusion_pytorch_model.bin`, a torch pickle); a pipeline folder
holds `model_index.json` with the U-Net in `unet/` and the scheduler's
`scheduler_config.json` in `scheduler/`. Both layouts are read; what is written
is the pipeline layout, which `DDPMPipeline.from_pretrained(DIR)` and
`UNet2DModel.from_pretrained(DIR, subfolder="unet")` read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from diffusion_jax.convert.diffusers_unet import ConversionError

WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"cannot read {path}: {e}") from None
  if not isinstance(d, dict):
    raise ConversionError(f"{path} holds a {type(d).__name__}, not a JSON object")
  return d


def unet_dir(src: str) -> str:
  """The folder with the U-Net's config.json: `src` itself or `src/unet`."""
  for d in (src, os.path.join(src, "unet")):
    if os.path.isfile(os.path.join(d, "config.json")) and any(
        os.path.exists(os.path.join(d, w)) for w in (WEIGHTS_SAFETENSORS, WEIGHTS_BIN)):
      return d
  if not os.path.isdir(src):
    raise ConversionError(f"--src={src!r} is not a directory.")
  raise ConversionError(
      f"--src={src!r} is not a diffusers U-Net folder: expected config.json with "
      f"{WEIGHTS_SAFETENSORS} (or {WEIGHTS_BIN}) in it or in its unet/ subfolder; it holds "
      f"{sorted(os.listdir(src))[:12]}.")


def scheduler_path(src: str, unet: str, explicit: Optional[str]) -> str:
  """The scheduler config beside the U-Net (or the one given explicitly)."""
  if explicit:
    if not os.path.isfile(explicit):
      raise ConversionError(f"--scheduler={explicit!r} does not exist.")
    return explicit
  candidates = [os.path.join(src, SCHEDULER_CONFIG), os.path.join(src, "scheduler",
                                                                  SCHEDULER_CONFIG),
                os.path.join(unet, SCHEDULER_CONFIG),
                os.path.join(os.path.dirname(os.path.abspath(unet)), "scheduler",
                             SCHEDULER_CONFIG)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ConversionError(
      f"No {SCHEDULER_CONFIG} found for {src!r} (looked in {candidates}): the schedule the "
      "model was trained with must come from its scheduler config. Pass "
      "--scheduler=PATH/scheduler_config.json.")


def read_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of a U-Net folder and the file it came from.

  safetensors needs no torch; a .bin is a torch pickle and needs torch.
  """
  st, pt = os.path.join(folder, WEIGHTS_SAFETENSORS), os.path.join(folder, WEIGHTS_BIN)
  if os.path.exists(st):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(st)), st
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
      raise ConversionError(f"cannot read {st}: {type(e).__name__}: {e}") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only .bin files need it)
  except ImportError:
    raise ConversionError(
        f"{folder} has only {WEIGHTS_BIN}, a torch pickle: reading it needs torch "
        "(pip install torch). Or convert it once where torch is installed: "
        "UNet2DModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True) "
        "writes the .safetensors this importer reads without torch.") from None
  state = torch.load(pt, map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() for k, v in state.items()}, pt


def write_weights(state: dict[str, np.ndarray], folder: str) -> str:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, WEIGHTS_SAFETENSORS)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path,
            metadata={"format": "pt"})  # diffusers/transformers check this field
  return path


def write_json(obj: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
