r"""Entry point: parses flags and dispatches; the work lives in train/sample.

  python -m diffusion_jax.main --config=configs/cifar10.py --workdir=DIR
  python -m diffusion_jax.main --mode=sample --workdir=DIR \
      [--config=configs/from_workdir.py:DIR --config.sample.method=ddim ...]
  python -m diffusion_jax.main --mode=eval --workdir=DIR    # metrics of config.eval
  python -m diffusion_jax.main --mode=sample --workdir=OUT \
      --config=configs/cascade.py:BASE_DIR,SR_DIR             # a cascade, stage by stage
                                                              # (--mode=eval scores it)
  python -m diffusion_jax.main --mode=sample --workdir=OUT \
      --config=configs/unclip.py:PRIOR_DIR,DECODER_DIR        # unCLIP (DALL-E 2)
  python -m diffusion_jax.main --mode=distill --workdir=OUT \
      --config=configs/distill.py:TEACHER_DIR                 # few-step students

`--config.a.b=value` overrides any field; a misspelt field is an error.
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from diffusion_jax import (cascade, checkpointing, evaluate, multihost, sample, train,
                           xla_flags)
from diffusion_jax.distill import rounds
from diffusion_jax.unclip import evaluation as unclip_eval
from diffusion_jax.unclip import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (a Python file with get_config()). In sample mode it "
    "defaults to the config saved in --workdir.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "distill"], "What to do.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs outside TPU/SLURM "
                    "(default: $JAX_COORDINATOR_ADDRESS). TPU pods and SLURM need none of "
                    "these three flags.")
flags.DEFINE_integer("num_processes", None,
                     "Processes in the run, with --coordinator_address (default: "
                     "$JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None,
                     "This process's index in [0, num_processes), with "
                     "--coordinator_address (default: $JAX_PROCESS_ID).")
flags.DEFINE_integer("distributed_init_timeout", 300,
                     "Multi-process runs: seconds every process waits for the coordinator "
                     "and for all processes to connect before failing.")
flags.DEFINE_integer("distributed_heartbeat_timeout", 100,
                     "Multi-process runs: seconds after which a silent (dead) process makes "
                     "the others abort instead of hanging.")
flags.mark_flags_as_required(["workdir"])
flags.DEFINE_string(
    "compilation_cache_dir", "",
    "JAX's persistent compilation cache, so a restart does not recompile; '' means "
    "<parent of --workdir>/.jax_compilation_cache, 'none' turns it off.")
flags.DEFINE_bool("allow_fresh_start", False,
                  "Train mode: if the workdir has checkpoint steps but none can be read, "
                  "move them to checkpoints_set_aside/ and start from step 0 (without it, "
                  "that is an error and nothing is moved).")
flags.DEFINE_bool("verbose_libraries", False,
                  "Also show the INFO logs of Orbax (many lines per checkpoint).")


def _quiet_libraries(record) -> bool:
  """Drops INFO records logged from inside Orbax; keeps its warnings."""
  return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def _enable_compilation_cache(cache_dir: str, workdir: str) -> None:
  if cache_dir == "none":
    return
  if not cache_dir:
    cache_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)),
                             ".jax_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  # Cache every executable that took over 0.5 s to compile, on every backend.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a project message for a bad --config override.

  ml_collections applies `--config.a.b=v` while flags are parsed, so a
  misspelt field would otherwise end in its own traceback.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:  # what absl's own parser reports, without a traceback
    print(f"FATAL Flags parsing error: {e}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    # ml_collections' message is a repr with escaped quotes and newlines.
    detail = " ".join(str(e).encode().decode("unicode_escape").split()).replace("'", "")
    print(f"Bad command line: a --config override could not be applied ({detail}). "
          f"Overrides given: {' '.join(bad) or '(none)'}. Each must name a field of the "
          "config file (see diffusion_jax/default_config.py), e.g. --config.optim.lr=1e-4.",
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  added_xla_flags = xla_flags.apply_defaults()  # before JAX's first computation
  if not FLAGS.verbose_libraries:
    # Orbax logs through absl's logger; a filter on it sees every record.
    std_logging.getLogger("absl").addFilter(_quiet_libraries)
  _enable_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.workdir)
  multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                       init_timeout_s=FLAGS.distributed_init_timeout,
                       heartbeat_timeout_s=FLAGS.distributed_heartbeat_timeout)
  if jax.process_index() != 0:
    # One process logs progress; the others' INFO lines would repeat it N times.
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if config is None:
    if FLAGS.mode == "train":
      raise app.UsageError("--config is required for --mode=train, e.g. "
                           "--config=configs/digits.py")
    config = checkpointing.load_config(FLAGS.workdir)
  logging.info("Mode %s, workdir %s, config:\n%s", FLAGS.mode, FLAGS.workdir, config)
  if added_xla_flags:
    logging.info("Default XLA flags added (yours in XLA_FLAGS take precedence): %s",
                 " ".join(added_xla_flags))
  if "unclip" in config:
    if FLAGS.mode == "train":
      raise app.UsageError("An unCLIP config (configs/unclip.py) is for --mode=sample or "
                           "--mode=eval; train the CLIP, prior and decoder with their own "
                           "configs (configs/shapes_clip.py, shapes_unclip_*.py).")
    if FLAGS.mode == "eval":
      unclip_eval.evaluate_unclip(config, FLAGS.workdir)
    else:
      pipeline.sample_unclip(config, FLAGS.workdir)
  elif "cascade" in config:
    if FLAGS.mode == "train":
      raise app.UsageError("A cascade config (configs/cascade.py) is for --mode=sample or "
                           "--mode=eval; train each stage with its own config.")
    if FLAGS.mode == "eval":
      evaluate.evaluate_cascade(config, FLAGS.workdir)
    else:
      cascade.sample_cascade(config, FLAGS.workdir)
  elif FLAGS.mode == "distill":
    rounds.distill(config, FLAGS.workdir)
  elif FLAGS.mode == "train":
    train.train_and_evaluate(config, FLAGS.workdir, allow_fresh_start=FLAGS.allow_fresh_start)
  elif FLAGS.mode == "eval":
    evaluate.evaluate(config, FLAGS.workdir)
  else:
    sample.sample_and_save(config, FLAGS.workdir)


if __name__ == "__main__":
  # An error on one process of a multi-process run ends the run in seconds.
  app.run(multihost.fail_fast()(main), flags_parser=_parse_flags)
