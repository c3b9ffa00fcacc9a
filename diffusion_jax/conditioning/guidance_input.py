"""The guidance scale as a model input (model.guidance_embed): `cond['guidance']`, float [B].

A guidance-distilled student (Meng et al. 2023, distill/guided.py) learns the
classifier-free-guided output of its teacher at a scale it is given, so it
samples guided images in one network pass per step instead of the batched
conditional and unconditional pair. The scale stays a runtime argument of the
sampler (`generation.make_sample_fn`'s `guidance_scale`, default
`sample.guidance_scale`), which hands it to the model as this entry; a request
carries nothing for it. The student is trained on scales in
[distill.guidance_min, distill.guidance_max] only, so a scale outside is refused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.conditioning import base
from diffusion_jax.config_checks import require


class GuidanceInput(base.Kind):
  """The guidance scale of a guidance-distilled student, fed to the network."""
  name = "a guidance scale"
  takes_guidance_scale = True

  @classmethod
  def active(cls, config: ml_collections.ConfigDict) -> bool:
    return bool(config.model.guidance_embed)

  @staticmethod
  def validate(config: ml_collections.ConfigDict) -> None:
    if not config.model.guidance_embed:
      return
    d = config.distill
    require(config.conditioning.type != "none", "model.guidance_embed=True takes a "
            "guidance scale, which needs a conditional model (conditioning.type='class' "
            "or 'text').")
    require(0.0 <= d.guidance_min <= d.guidance_max, f"distill.guidance_min="
            f"{d.guidance_min} and guidance_max={d.guidance_max} must satisfy "
            "0 <= min <= max.")
    try:
      check_range(config.sample.guidance_scale, config, "sample.guidance_scale")
    except ValueError as e:
      require(False, str(e))

  def request_keys(self) -> tuple[str, ...]:
    return ()  # the sampler hands the scale over, not the request

  def model_keys(self) -> tuple[str, ...]:
    return ("guidance",)

  def request(self, num_samples: int, given: dict) -> tuple[dict, dict]:
    del num_samples, given
    return {}, {}

  def init(self, batch_size: int) -> dict[str, jax.Array]:
    return {"guidance": jnp.ones((batch_size,), jnp.float32)}

  def train(self, batch, rng, schedule) -> dict[str, jax.Array]:
    raise ValueError("A model with model.guidance_embed=True learns from a guided teacher "
                     "(--mode=distill, distill/guided.py draws the scales); Algorithm 1 has "
                     "no target that depends on the scale. Train with guidance_embed=False.")

  def for_sampling(self, cond, rng, schedule) -> dict[str, jax.Array]:
    del cond, rng, schedule
    return {}  # generation.make_sample_fn adds the sampler's scale


def check_range(scale, config: ml_collections.ConfigDict, what: str = "guidance_scale") -> None:
  """Raises ValueError for a scale outside the range the student was trained on."""
  lo, hi = config.distill.guidance_min, config.distill.guidance_max
  s = np.asarray(scale, np.float64)
  bad = s[(s < lo) | (s > hi)]
  if bad.size:
    raise ValueError(f"{what}={float(bad[0])}: this guidance-distilled model learnt scales "
                     f"in [{lo}, {hi}] only (distill.guidance_min/max); pick one inside.")
