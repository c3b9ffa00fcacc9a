"""The offline CPU default: a small U-Net on 16x16 handwritten digits.

Builds the `digits` data set from scikit-learn's bundled images on first use
(no network). About 6 minutes on a 2-core CPU, sampling included.

Where it departs from default.py (the DDPM recipe), it does so by measurement
(`benchmarks/digits_ablation.py`, docs/benchmarks.md "Default quality"): the
embedding enters each ResBlock after its GroupNorm, the loss is min-SNR
weighted, and sample mode draws ancestral samples with the posterior variance
on 100 respaced steps.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.patch_size = 2
  # At 32 channels GroupNorm(32) has one channel per group, so an embedding
  # added before it (DDPM) is normalised away; as scale and shift after it
  # (improved-diffusion) it reaches every block.
  config.model.scale_shift_norm = True
  # min-SNR-5 (Hang et al. 2023): the eps-MSE of each timestep weighted by
  # min(SNR, 5) / SNR, which weighs the nearly clean timesteps down and leaves
  # more of a short run to the noisier ones, where shapes form. Same steps/s.
  config.diffusion.weighting = "min_snr"
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.training.batch_size = 64
  config.training.num_train_steps = 4000
  # The deterministic samplers (DDIM, DPM-Solver++) give this short-trained
  # model off-manifold, blotchy digits (FD 2-5x the floor); ancestral steps
  # with the posterior variance (= DDIM with eta 1) correct its errors, and
  # 100 respaced steps scored better than 50, 200 or 1,000.
  config.sample.method = "ancestral"
  config.sample.num_steps = 100
  config.sample.variance = "fixed_small"
  return config
