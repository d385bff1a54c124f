"""Shared defaults for every config; not meant to be run on its own.

Each dataset config imports `get_config()` from here and overrides fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'   # a TFDS name
  data.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default
  data.random_flip = True

  # U-Net fields (diffusion_jax.models.unet.UNetConfig). out_ch is derived from the data's
  # channels and the variance type; num_classes from the dataset when class_conditional.
  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.resblock_scale_shift = False
  model.num_heads = 1
  model.class_conditional = False

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'linear'
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.zero_terminal_snr = False
  diffusion.mean_type = 'eps'
  diffusion.var_type = 'fixedlarge'
  diffusion.loss_type = 'mse'
  diffusion.snr_gamma = ml_collections.config_dict.placeholder(float)  # None: unweighted
  diffusion.timestep_sampler = 'uniform'  # or 'importance' (by the L_vlb history)

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128             # global, over all devices and hosts
  training.num_train_steps = 800_000
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.ema_decay = 0.9999
  training.compute_dtype = 'float32'    # or 'bfloat16' (parameters stay float32)
  training.grad_accum_steps = 1         # micro-batches per step, each batch_size / this
  training.label_dropout = 0.1          # class-conditional: p(null label), for guidance
  training.sample_every_steps = 0       # 0: never; a grid of EMA samples in the workdir
  training.num_samples = 64
  training.sample_steps = 100           # DDIM steps for the training-time sample grid

  config.optimizer = optimizer = ml_collections.ConfigDict()
  optimizer.learning_rate = 2e-4
  optimizer.warmup_steps = 5000
  optimizer.grad_clip = 1.0
  optimizer.b1 = 0.9
  optimizer.b2 = 0.999
  optimizer.eps = 1e-8

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.every_steps = 0            # 0: no periodic evaluation during training
  evaluation.num_samples = 256          # samples for FID during training
  evaluation.bpd_examples = 256         # test examples for bits/dim during training
  evaluation.sample_steps = 100         # DDIM steps for those samples
  # FID network weights for datasets other than digits (digits use their own classifier);
  # None: no sample metrics there. See diffusion_jax/models/inception.py.
  evaluation.inception_weights = ml_collections.config_dict.placeholder(str)
  return config
