r"""Converts published checkpoints to workdirs and back; flags and dispatch only.

  python -m diffusion_jax.convert import-diffusers --src=DIR --workdir=W \
      [--config=configs/cifar10.py] [--scheduler=PATH/scheduler_config.json]
  python -m diffusion_jax.convert export-diffusers --workdir=W --dst=DIR \
      [--checkpoint_step=N]
  python -m diffusion_jax.convert import-tf --src=PATH/model.ckpt-790000 --workdir=W \
      --config=configs/cifar10.py

`--config` supplies what a checkpoint does not say (data set, optimiser, sample
and eval settings); the architecture and schedule come from the checkpoint and
override it. The workdir then runs `--mode=sample` and `--mode=eval` unchanged.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.convert import diffusers as diffusers_io
from diffusion_jax.convert.diffusers_unet import ConversionError

COMMANDS = ("import-diffusers", "export-diffusers", "import-tf")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config (data, optimiser, sample, eval); "
                                "the checkpoint sets the model and the schedule.",
                                lock_config=True)
flags.DEFINE_string("src", None, "import-diffusers: a UNet2DModel folder or a pipeline folder "
                    "with unet/; import-tf: a checkpoint prefix (model.ckpt-N).")
flags.DEFINE_string("workdir", None, "The workdir to write (import) or read (export).")
flags.DEFINE_string("dst", None, "export-diffusers: the folder to write.")
flags.DEFINE_string("scheduler", None, "import-diffusers: the scheduler_config.json, if not "
                    "beside the U-Net.")
flags.DEFINE_integer("step", 0, "import: the checkpoint step to write.")
flags.DEFINE_integer("checkpoint_step", -1, "export: the step to export (-1: the latest).")
flags.DEFINE_bool("tf_ema", True, "import-tf: the EMA weights (the paper's samples) rather "
                  "than the raw ones.")


def _require(*names: str) -> None:
  missing = [f"--{n}" for n in names if getattr(FLAGS, n) is None]
  if missing:
    raise app.UsageError(f"{' '.join(missing)} required for this command.")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Give one command, one of {', '.join(COMMANDS)}; got {argv[1:]}.")
  command = argv[1]
  try:
    if command == "import-diffusers":
      _require("src", "workdir")
      diffusers_io.import_diffusers(FLAGS.src, FLAGS.workdir, FLAGS.config, FLAGS.scheduler,
                                    FLAGS.step)
      print(f"Wrote {FLAGS.workdir}: run --mode=sample --workdir={FLAGS.workdir}")
    elif command == "export-diffusers":
      _require("workdir", "dst")
      path = diffusers_io.export_diffusers(FLAGS.workdir, FLAGS.dst, FLAGS.checkpoint_step)
      print(f"Wrote {path} (UNet2DModel.from_pretrained({FLAGS.dst!r}, subfolder='unet'))")
    else:
      _require("src", "workdir", "config")
      # pylint: disable-next=g-import-not-at-top  (TensorFlow only for this command)
      from diffusion_jax.convert import ddpm_tf
      ddpm_tf.import_tf(FLAGS.src, FLAGS.workdir, FLAGS.config, ema=FLAGS.tf_ema,
                        step=FLAGS.step)
      print(f"Wrote {FLAGS.workdir}: run --mode=sample --workdir={FLAGS.workdir}")
  except ConversionError as e:
    print(f"Conversion failed, nothing was written: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
