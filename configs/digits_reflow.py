"""Rectified flow's reflow (Liu et al. 2023) of the digits flow (configs/digits_flow.py): a
straighter flow, for sampling in 1 to 4 Euler steps (docs/flow.md).

  python train.py --config configs/digits_flow.py --workdir /tmp/digits_flow       # the teacher
  python train.py --config configs/digits_reflow.py --workdir /tmp/digits_reflow   # reflowed
  python sample.py --workdir /tmp/digits_reflow --steps 2      # Euler, 2 evaluations

The teacher's PF-ODE (DPM-Solver++ 2M, 20 steps) joins 5,000 draws of ε to their x₀, once,
into the workdir (`reflow_pairs/`); the student starts from the teacher's EMA weights and
learns the straight velocity ε − x₀ between each pair, at t drawn uniformly (Liu et al.'s).
Sampled with ddim on the flow's trailing levels: Euler in t, one evaluation per level.
"""

from configs import digits_flow


def get_config():
  config = digits_flow.get_config()
  d = config.distill
  d.teacher = '/tmp/digits_flow'
  d.method = 'reflow'
  d.num_pairs = 5000
  d.pair_sampler = 'dpmpp_2m'
  d.pair_steps = 20
  config.diffusion.t_density = 'uniform'
  config.training.num_train_steps = 2000
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 1000
  config.training.sampler = 'ddim'
  config.training.sample_steps = 2
  config.eval.sampler = 'ddim'
  config.eval.sample_steps = 4
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 0
  return config
