"""Progressive distillation (Salimans & Ho 2022) of the default digits model: a student of 8
DDIM steps, halved every round down to 1.

  python train.py --config configs/digits.py --workdir /tmp/digits            # the teacher
  python train.py --config configs/digits_pd.py --workdir /tmp/digits_pd     # its student
  python sample.py --workdir /tmp/digits_pd --num_samples 1797               # 1 step
  python sample.py --workdir /tmp/digits_pd --step 1200 --steps 2            # round 3's

Round r (from 0) ends at step 400·(r + 1); the checkpoint there holds the student of
8/2^r steps, sampled with ddim on the 'trailing' levels. Measured in docs/distillation.md.
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
  d.method = 'pd'
  d.start_steps = 8
  d.final_steps = 1
  d.steps_per_round = 400
  config.training.num_train_steps = 1600      # 4 rounds: 8, 4, 2, 1 steps
  config.training.checkpoint_every_steps = 400
  config.training.keep_checkpoints = 10
  config.training.ema_decay = 0.995
  config.training.ema_warmup = False
  config.training.sample_every_steps = 400
  config.training.sampler = 'ddim'
  config.training.sample_steps = 1
  config.training.step_schedule = 'trailing'
  config.eval.sampler = 'ddim'
  config.eval.sample_steps = 1
  config.eval.step_schedule = 'trailing'
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 0
  return config
