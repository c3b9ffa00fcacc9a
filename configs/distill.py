"""Progressive distillation of a trained model (diffusion_jax/distill/rounds.py).

  python -m diffusion_jax.main --mode=distill --workdir=OUT \
      --config=configs/distill.py:TEACHER_DIR [--config.distill.steps_per_round=2000]

The teacher's saved config (its model, schedule and data) with the `distill`
section of diffusion_jax/default_config.py, `distill.teacher_workdir` set to
TEACHER_DIR. Round n of the result is OUT/steps_<n>, an ordinary workdir:
  python -m diffusion_jax.main --mode=sample --workdir=OUT/steps_4
"""
from configs import from_workdir


def get_config(teacher_workdir):
  config = from_workdir.get_config(teacher_workdir)
  config.distill.teacher_workdir = teacher_workdir
  return config
