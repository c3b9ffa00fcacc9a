"""Writes `diffusers_schedulers.npz`: diffusers' DDIM and DDPM schedulers on a toy model.

Needs torch and diffusers only (no JAX), so it runs in a torch-only venv:

  python tests/data/make_scheduler_reference.py tests/data

`tests/test_samplers.py` runs the project's samplers (`timestep_spacing`, `ddim_eps`,
an explicit `x_T`) on the same inputs and checks them against the `.npz`.

Setup: T = 1000 training steps, DDPM's linear betas 1e-4 .. 0.02 (diffusers'
`beta_schedule="linear"`, built in float32), 10 sampling steps, steps_offset 0,
set_alpha_to_one True (the defaults), prediction "epsilon"; x_T `[2, 4, 4, 1]`
float32 (seeded numpy, scaled by 1.5 so clipping is active late in the chain too)
and the analytic "model" `eps(x, t) = tanh(x) (0.3 + 0.5 t / 1000) + 0.1 sin(3 x)`
(`toy_eps`; the test has a JAX twin), the coefficient computed in float32.

For each spacing S in ("linspace", "leading", "trailing") the `.npz` holds:

* `ddim_S_C_*`, DDIMScheduler, eta 0, for C = `clip_raw` (clip_sample=True, the
  default use_clipped_model_output=False), `clip_clipped` (clip_sample=True,
  use_clipped_model_output=True), `noclip` (clip_sample=False);
* `ddpm_S_V_*`, DDPMScheduler with clip_sample=True and variance_type V in
  (`fixed_small`, `fixed_large`), its noise (`randn_tensor`) patched to return
  `ddpm_noise` (0.5 N(0, 1), seeded, the same array at every step), so each step is
  deterministic: its mean plus its standard deviation times that array where
  diffusers adds noise at all (where t > 0);

each with `t` (timesteps visited, int `[n]`), `t_prev` (where each step goes: for
DDIM `t - T // n` as its `step` computes it, for DDPM `previous_timestep(t)`; -1
means alpha-bar 1), `abar`, `abar_prev` (the float32 alpha-bars the step used),
`x` (the sample after each step, `[n, 2, 4, 4, 1]`) and `x0` (each step's
`pred_original_sample`, clipped where the scheduler clips). Also `x_T`, `ddpm_noise`,
`alphas_cumprod` (diffusers' float32 `[T]`) and `diffusers_version`.
"""
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

T, N_STEPS, SHAPE = 1000, 10, (2, 4, 4, 1)
SPACINGS = ("linspace", "leading", "trailing")
DDIM_CASES = {"clip_raw": (True, False), "clip_clipped": (True, True), "noclip": (False, False)}
COMMON = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon", steps_offset=0)


def toy_eps(x: torch.Tensor, t: int) -> torch.Tensor:
  """The analytic eps model; the coefficient in float32 as the JAX twin computes it."""
  tf = torch.tensor(float(t), dtype=torch.float32)
  return torch.tanh(x) * (0.3 + 0.5 * tf / 1000.0) + 0.1 * torch.sin(3.0 * x)


def run_ddim(spacing: str, clip_sample: bool, use_clipped: bool, x_T: np.ndarray) -> dict:
  s = DDIMScheduler(clip_sample=clip_sample, set_alpha_to_one=True, timestep_spacing=spacing,
                    **COMMON)
  s.set_timesteps(N_STEPS)
  x = torch.from_numpy(x_T)
  out = {k: [] for k in ("t", "t_prev", "abar", "abar_prev", "x", "x0")}
  for t in s.timesteps:
    t = int(t)
    prev = t - T // N_STEPS  # DDIMScheduler.step's prev_timestep
    res = s.step(toy_eps(x, t), t, x, eta=0.0, use_clipped_model_output=use_clipped)
    x = res.prev_sample
    out["t"].append(t)
    out["t_prev"].append(max(prev, -1))
    out["abar"].append(float(s.alphas_cumprod[t]))
    out["abar_prev"].append(float(s.alphas_cumprod[prev] if prev >= 0 else
                                  s.final_alpha_cumprod))
    out["x"].append(x.numpy().copy())
    out["x0"].append(res.pred_original_sample.numpy().copy())
  return out


def run_ddpm(spacing: str, variance: str, x_T: np.ndarray, noise: np.ndarray) -> dict:
  s = DDPMScheduler(clip_sample=True, variance_type=variance, timestep_spacing=spacing,
                    **COMMON)
  s.set_timesteps(N_STEPS)
  x = torch.from_numpy(x_T)
  out = {k: [] for k in ("t", "t_prev", "abar", "abar_prev", "x", "x0")}
  fixed = lambda shape, **_: torch.from_numpy(noise).reshape(shape)
  saved, scheduling_ddpm.randn_tensor = scheduling_ddpm.randn_tensor, fixed
  try:
    for t in s.timesteps:
      t = int(t)
      prev = int(s.previous_timestep(t))
      res = s.step(toy_eps(x, t), t, x)
      x = res.prev_sample
      out["t"].append(t)
      out["t_prev"].append(prev)
      out["abar"].append(float(s.alphas_cumprod[t]))
      out["abar_prev"].append(float(s.alphas_cumprod[prev] if prev >= 0 else s.one))
      out["x"].append(x.numpy().copy())
      out["x0"].append(res.pred_original_sample.numpy().copy())
  finally:
    scheduling_ddpm.randn_tensor = saved
  return out


def main(out_dir: str) -> None:
  rng = np.random.default_rng(0)
  x_T = (1.5 * rng.standard_normal(SHAPE)).astype(np.float32)
  noise = (0.5 * rng.standard_normal(SHAPE)).astype(np.float32)
  arrays = {"x_T": x_T, "ddpm_noise": noise, "diffusers_version": np.array(diffusers.__version__),
            "alphas_cumprod": DDPMScheduler(**COMMON).alphas_cumprod.numpy()}
  runs = {}
  for spacing in SPACINGS:
    for case, (clip, use_clipped) in DDIM_CASES.items():
      runs[f"ddim_{spacing}_{case}"] = run_ddim(spacing, clip, use_clipped, x_T)
    for variance in ("fixed_small", "fixed_large"):
      runs[f"ddpm_{spacing}_{variance}"] = run_ddpm(spacing, variance, x_T, noise)
  for name, run in runs.items():
    for key, values in run.items():
      dtype = np.int32 if key in ("t", "t_prev") else np.float32
      arrays[f"{name}_{key}"] = np.asarray(values, dtype)
  # Both schedulers build the same float32 schedule.
  ddim_abar = DDIMScheduler(**COMMON).alphas_cumprod.numpy()
  assert np.array_equal(ddim_abar, arrays["alphas_cumprod"])
  path = os.path.join(out_dir, "diffusers_schedulers.npz")
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({os.path.getsize(path)} bytes), diffusers {diffusers.__version__}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
