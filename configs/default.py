"""Shared defaults for every config; not meant to be run on its own.

Each dataset config imports `get_config()` from here and overrides fields.
"""

import ml_collections

from diffusion_jax.sampling import config as sampler_config
from diffusion_jax import spec


def _sampler_options(group: ml_collections.ConfigDict) -> None:
  """The sampler's options other than steps (`sample_steps`), by the names of sample.py's
  and evaluate's flags (`sampler_config.OPTIONS`); None: the sampler's default."""
  kinds = dict(step_schedule=str)
  for name in sampler_config.OPTIONS:
    if name != 'steps':
      group[name] = ml_collections.config_dict.placeholder(kinds.get(name, float))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'   # a TFDS name
  data.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default
  data.random_flip = True
  # 'grain': read element by element from the prepared files (any size); 'memory': the split
  # loaded into host memory once and batched with NumPy (datasets that fit; far less host
  # time per step, see bench/startup.py).
  data.pipeline = 'grain'

  # U-Net fields: UNetConfig's, with its defaults (the paper's CIFAR-10 model). out_ch is
  # derived from the data's channels and the variance type, num_classes from the dataset when
  # class_conditional, the dtype from training.compute_dtype.
  config.model = model = ml_collections.ConfigDict(spec.default_model_fields())
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
  # The score-based family (docs/score_based.md): the process ('vp', DDPM's; 've', NCSN's;
  # 'subvp'; 'edm', Karras et al.'s; 'flow', the linear path) and the objective ('ddpm': the
  # losses above at discrete timesteps, 'vp' only; 'dsm' or 'ssm': score matching at continuous
  # t; 'edm' with the 'edm' process and mean_type; 'flow' with the 'flow' process and
  # mean_type). sigma_min/max: the 've' and 'edm' processes' range.
  diffusion.process = 'vp'
  diffusion.objective = 'ddpm'
  diffusion.sigma_min = 0.01
  diffusion.sigma_max = 50.0
  # EDM (docs/edm.md): the data's standard deviation σ_d; training's ln σ ~ N(p_mean, p_std²).
  diffusion.sigma_data = 0.5
  diffusion.p_mean = -1.2
  diffusion.p_std = 1.2
  # Flow matching (docs/flow.md; objective, process and mean_type 'flow'): the density of t
  # ('uniform' or 'logit_normal', t = sigmoid(n), n ~ N(t_mean, t_std²)).
  diffusion.t_density = 'uniform'
  diffusion.t_mean = 0.0
  diffusion.t_std = 1.0

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128             # global, over all devices and hosts
  training.num_train_steps = 800_000
  training.time_budget_s = 0.0          # > 0: stop earlier, checkpointed, after this wall time
  # Steps per dispatch (a lax.scan over that many batches): the host's per-step cost divided
  # by it, for accelerators whose step is shorter than Python's dispatch. The step counts
  # below (and eval.every_steps) must be multiples of it.
  training.steps_per_call = 1
  training.log_every_steps = 100
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3
  training.ema_decay = 0.9999
  training.ema_warmup = False           # True: decay min(ema_decay, (1 + n) / (10 + n))
  # EDM's EMA instead of ema_decay: a half-life in thousands of images, ramped up over the
  # first images seen (half-life at most ramp-up × images); None: off.
  training.ema_halflife_kimg = ml_collections.config_dict.placeholder(float)
  training.ema_rampup_ratio = ml_collections.config_dict.placeholder(float)
  training.compute_dtype = 'float32'    # or 'bfloat16' (parameters stay float32)
  training.grad_accum_steps = 1         # micro-batches per step, each batch_size / this
  training.label_dropout = 0.1          # class-conditional: p(null label), for guidance
  training.sample_every_steps = 0       # 0: never; a grid of EMA samples in the workdir
  training.num_samples = 64
  training.sampler = 'ddim'             # the training-time sample grid's sampler (sample.py's)
  training.sample_steps = 100           # and its steps
  _sampler_options(training)            # and its eta, step_schedule, churn, snr, rtol, ...

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
  evaluation.sampler = 'ddim'           # the sampler of those samples
  evaluation.sample_steps = 100         # and its steps; with its options below, the sampler
  _sampler_options(evaluation)          # that sample.py and evaluate use unless told otherwise
  # FID network weights for datasets other than digits (digits use their own classifier);
  # None: no sample metrics there. See diffusion_jax/models/inception.py.
  evaluation.inception_weights = ml_collections.config_dict.placeholder(str)

  # Distillation (docs/distillation.md): with a teacher workdir set, train.py trains a student
  # of that teacher (its network and process; it starts from the teacher's EMA weights).
  config.distill = distill = ml_collections.ConfigDict()
  distill.teacher = ml_collections.config_dict.placeholder(str)   # None: an ordinary run
  distill.method = 'cd'           # 'cd' (consistency), 'pd' (progressive) or 'reflow'
  # cd: N Karras levels, one teacher Heun step between neighbours; the target network's EMA
  # decay μ; the distance ('l2' or 'pseudo_huber', whose c None means 0.00054·√d); σ_d.
  distill.num_levels = 18
  distill.target_decay = 0.95
  distill.distance = 'l2'
  distill.huber_c = ml_collections.config_dict.placeholder(float)
  distill.sigma_data = 0.5
  # pd: the student's steps in round 1, the last round's, and the training steps per round.
  distill.start_steps = 8
  distill.final_steps = 1
  distill.steps_per_round = 1000
  # reflow (a flow teacher; objective 'flow'): pairs (ε, x₀ = the teacher's ODE from ε), made
  # once into the workdir with this deterministic sampler and its steps.
  distill.num_pairs = 5000
  distill.pair_sampler = 'dpmpp_2m'
  distill.pair_steps = 20
  return config
