"""Progressive distillation of the DDPM CIFAR-10 workdir (configs/cifar10.py), with the
settings of openai/consistency_models_cifar10's configs/cifar10_ve_progressive_distillation.py
(the baseline of Song et al. 2023, after Salimans & Ho 2022): batch 512, Adam at 5e-5 with
gradient clipping at 1, no EMA, the truncated-SNR weighting, 50,000 steps per halving.

  python train.py --config configs/cifar10_pd.py --workdir gs://bucket/cifar10_pd \
      --config.distill.teacher=gs://bucket/cifar10

Differences: their teacher is EDM's and starts from 4,096 steps; a DDPM teacher of T = 1000
steps starts here from 256 (its first teacher takes 512 DDIM steps), halved 8 times to 1
(9 rounds). Their learning rate decays linearly to 0 within each round; here it is constant.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  d = config.distill
  # The student reads the teacher's weights as v (x̂₀ = αx − σv): an ε output's x̂₀ =
  # (x − σε)/α magnifies its error by 1/α (157 at t = 1), which one to four steps cannot
  # correct (Salimans & Ho 2022, section 4).
  config.diffusion.mean_type = 'v'
  d.teacher = '/tmp/cifar10'
  d.method = 'pd'
  d.start_steps = 256
  d.final_steps = 1
  d.steps_per_round = 50_000
  t = config.training
  t.batch_size = 512
  t.num_train_steps = 9 * 50_000
  t.checkpoint_every_steps = 10_000
  t.ema_decay = 0.0
  t.ema_warmup = False
  t.sampler = 'ddim'
  t.sample_steps = 1
  t.step_schedule = 'trailing'
  config.eval.sampler = 'ddim'
  config.eval.sample_steps = 1
  config.eval.step_schedule = 'trailing'
  o = config.optimizer
  o.learning_rate = 5e-5
  o.warmup_steps = 0
  o.grad_clip = 1.0
  return config
