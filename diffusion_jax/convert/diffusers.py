"""Import a diffusers UNet2DModel folder as a workdir; export a workdir as one.

    python -m diffusion_jax.convert import-diffusers --src=DIR --workdir=W \
        [--config=configs/cifar10.py] [--scheduler=PATH]
    python -m diffusion_jax.convert export-diffusers --workdir=W --dst=DIR

The import takes the architecture from the U-Net's config.json, the schedule
and sampling choices from the scheduler config, and everything else (data set,
optimiser, sample count, eval) from `--config` (default: the default config).
The export writes the pipeline layout (model_index.json, unet/, scheduler/).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections

from diffusion_jax import builders, checkpointing, models
from diffusion_jax.convert import diffusers_files as files
from diffusion_jax.convert import diffusers_scheduler, diffusers_unet, workdir_io
from diffusion_jax.convert.diffusers_unet import ConversionError
from diffusion_jax.evaluation.inception import file_sha256


def folder_config(src: str, base: Optional[ml_collections.ConfigDict] = None,
                  scheduler: Optional[str] = None
                  ) -> tuple[ml_collections.ConfigDict, str, str]:
  """The run config a diffusers folder describes: (config, U-Net folder, scheduler path).

  The architecture comes from the U-Net's config.json, the schedule and sampling
  choices from the scheduler config, the rest from `base` (default: the default
  config).

  Raises:
    ConversionError: an architecture or schedule this project cannot represent
      exactly, naming the field.
  """
  unet = files.unet_dir(src)
  fields = diffusers_unet.model_fields(files.read_json(os.path.join(unet, "config.json")),
                                       os.path.join(unet, "config.json"))
  sched_path = files.scheduler_path(src, unet, scheduler)
  sched = diffusers_scheduler.config_fields(files.read_json(sched_path), sched_path)
  model = dict(fields["model"], num_classes=0, cond_vector_dim=0, cross_attn_dim=0,
               cross_attn_resolutions=(), low_res_channels=0, image_embed_dim=0,
               image_embed_tokens=0)
  config = workdir_io.build_config(base, dict(
      model=model, data=dict(image_size=fields["image_size"], channels=fields["channels"],
                             num_classes=0 if base is None else base.data.num_classes),
      conditioning=dict(type="none"), **sched))
  return config, unet, sched_path


def import_diffusers(src: str, workdir: str,
                     base: Optional[ml_collections.ConfigDict] = None,
                     scheduler: Optional[str] = None, step: int = 0
                     ) -> ml_collections.ConfigDict:
  """Converts a diffusers U-Net folder into a new workdir; returns its config.

  Raises:
    ConversionError: an architecture or schedule this project cannot represent
      exactly (naming the field), weights that do not match the config (naming
      the tensors), or a workdir that already holds a run.
  """
  config, unet, sched_path = folder_config(src, base, scheduler)
  state, weights_path = files.read_weights(unet)
  params = diffusers_unet.state_dict_to_params(state, param_shapes(config),
                                               len(config.model.ch_mult), weights_path)
  workdir_io.write_workdir(config, params, workdir, step=step, provenance=dict(
      format="diffusers UNet2DModel", src=os.path.abspath(src), weights=weights_path,
      weights_sha256=file_sha256(weights_path), scheduler_config=sched_path,
      num_tensors=len(state)))
  return config


def param_shapes(config: ml_collections.ConfigDict):
  """The U-Net's parameter shapes (ShapeDtypeStructs) for a config, nothing allocated."""
  model = models.create_model(config.model, config.data.channels)
  return jax.eval_shape(lambda: builders.init_params(model, config, jax.random.key(0)))


def export_diffusers(workdir: str, dst: str, step: Optional[int] = None) -> str:
  """Writes a workdir's EMA parameters as a diffusers pipeline folder.

  Returns:
    The path of the written safetensors file.

  Raises:
    ConversionError: the model has no UNet2DModel equivalent, or `dst` exists
      and is not empty.
  """
  if os.path.isdir(dst) and os.listdir(dst):
    raise ConversionError(f"--dst={dst!r} exists and is not empty; export into a new folder.")
  config = checkpointing.load_config(workdir)
  unet_cfg = diffusers_unet.diffusers_config(config.model.to_dict(), config.data.image_size,
                                             config.data.channels)
  sched_cfg = diffusers_scheduler.scheduler_config(config.diffusion.to_dict(),
                                                   config.sample.to_dict())
  _, params, step = workdir_io.read_ema(workdir, step, config)
  state = diffusers_unet.params_to_state_dict(params, len(config.model.ch_mult))
  path = files.write_weights(state, os.path.join(dst, "unet"))
  files.write_json(unet_cfg, os.path.join(dst, "unet", "config.json"))
  files.write_json(sched_cfg, os.path.join(dst, "scheduler", files.SCHEDULER_CONFIG))
  files.write_json(dict(_class_name="DDPMPipeline", unet=["diffusers", "UNet2DModel"],
                        scheduler=["diffusers", "DDPMScheduler"]),
                   os.path.join(dst, "model_index.json"))
  return path
