"""Consistency distillation (Song et al. 2023) of the default digits model: one to four
model evaluations per sample.

  python train.py --config configs/digits.py --workdir /tmp/digits            # the teacher
  python train.py --config configs/digits_cd.py --workdir /tmp/digits_cd     # its student
  python sample.py --workdir /tmp/digits_cd --num_samples 1797               # 1 evaluation

The student has the teacher's network and process and starts from its EMA weights; its
spec.json records the teacher, so sampling needs only the student's workdir. Another teacher:
--config.distill.teacher=PATH. Measured in docs/distillation.md.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  d = config.distill
  # The student reads the teacher's weights as v (x̂₀ = αx − σv): an ε output's x̂₀ =
  # (x − σε)/α magnifies its error by 1/α (157 at t = 1), which one to four steps cannot
  # correct (Salimans & Ho 2022, section 4).
  config.diffusion.mean_type = 'v'
  d.teacher = '/tmp/digits'
  d.method = 'cd'
  d.num_levels = 18          # the paper's N for CIFAR-10
  d.target_decay = 0.95      # μ, the paper's for CD on CIFAR-10
  d.distance = 'l2'          # LPIPS has no meaning at 8×8
  config.training.num_train_steps = 1400
  config.training.checkpoint_every_steps = 200
  config.training.keep_checkpoints = 10
  config.training.ema_decay = 0.995
  config.training.ema_warmup = False   # the EMA starts at the teacher's weights
  config.training.sample_every_steps = 700
  config.training.sampler = 'consistency'
  config.training.sample_steps = 1
  config.eval.sampler = 'consistency'
  config.eval.sample_steps = 2
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 0
  return config
