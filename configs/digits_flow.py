"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on the embedded digits,
offline on a CPU (docs/flow.md).

  python train.py --config configs/digits_flow.py --workdir /tmp/digits_flow
  python sample.py --workdir /tmp/digits_flow

The digits recipe (configs/digits.py: same U-Net, batch, steps and optimizer, so the same
training time) on the linear path x_t = (1 − t) x₀ + t ε: the network predicts the velocity
ε − x₀, trained at t drawn logit-normal (SD3's density, mean 0, std 1).

Measured (docs/flow.md, 1,797 samples): FD 0.44, precision 0.84 at 20 evaluations (dpmpp_2m,
the recommended sampler below), against the default's 0.58 and 0.71; 3.44 and 0.87 at 4 Euler
steps (`--sampler ddim --steps 4`). The uniform density gave 3.93 and 0.85 at 4, 0.43 and 0.78
at 20.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  d = config.diffusion
  d.process = 'flow'
  d.objective = 'flow'
  d.mean_type = 'flow'
  d.t_density = 'logit_normal'
  d.t_mean = 0.0
  d.t_std = 1.0
  # The grid: Euler in t over 20 levels (ddim on the flow's 'trailing' levels).
  config.training.sampler = 'ddim'
  config.training.sample_steps = 20
  config.eval.sampler = 'dpmpp_2m'
  config.eval.sample_steps = 20
  return config
