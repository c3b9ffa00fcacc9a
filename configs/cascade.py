"""A cascade to sample: a base model's workdir, then super-resolution workdirs.

  python -m diffusion_jax.main --mode=sample --workdir=OUT \
      --config=configs/cascade.py:BASE_DIR,SR_DIR[,SR_DIR2...] \
      --config.cascade.num_samples=64 --config.stage_1.sample.num_steps=20

`stage_i` is the config saved by the training run in the i-th workdir
(missing fields take their defaults), so its sampler settings
(`stage_i.sample.*`, `stage_i.superres.sample_aug_level`) can be overridden.
Labels (`cascade.labels`, as `sample.labels`) go to every class-conditional
stage. See diffusion_jax/cascade.py for what is written.
"""
import ml_collections

from configs import from_workdir


def get_config(workdirs: str):
  dirs = tuple(d for d in workdirs.split(",") if d)
  config = ml_collections.ConfigDict()
  config.cascade = c = ml_collections.ConfigDict()
  c.workdirs = dirs
  c.num_samples = 64
  c.batch_size = 64  # Global per-call batch of every stage; must divide over devices.
  c.seed = 0  # Stage i uses seed + i.
  c.labels = ""  # Class-conditional cascades: "", "all", "7", "1,3,5".
  c.captions = ""  # Text-conditional cascades: "a;b" or "@FILE", as sample.captions.
  c.name = "cascade"
  for i, d in enumerate(dirs):
    config[f"stage_{i}"] = from_workdir.get_config(d)
  return config
