"""EDM's formulation (Karras et al. 2022) on the embedded digits, offline on a CPU
(docs/edm.md).

  python train.py --config configs/digits_edm.py --workdir /tmp/digits_edm
  python sample.py --workdir /tmp/digits_edm               # heun, its recommended sampler

The digits recipe (configs/digits.py: same U-Net, batch, steps and optimizer, so the same
training time) with EDM's process and objective: the network F is preconditioned,
D(x; σ) = c_skip x + c_out F(c_in x; ¼ ln σ); training draws ln σ ~ N(P_mean, P_std²) and
weights the loss by λ(σ) = (σ² + σ_d²)/(σσ_d)²; samples come from Heun's method on σ from
80 to 0.002 with ρ = 7 (35 evaluations).
"""

from configs import digits


def get_config():
  config = digits.get_config()
  d = config.diffusion
  d.process = 'edm'
  d.objective = 'edm'
  d.mean_type = 'edm'      # the network predicts F
  d.sigma_min = 0.002
  d.sigma_max = 80.0
  d.sigma_data = 0.75      # the digits' standard deviation in [-1, 1] (CIFAR-10's is 0.5)
  d.p_mean = -1.2
  d.p_std = 1.2
  # EDM's EMA: a half-life in images with a ramp-up, instead of ema_decay and its warm-up.
  config.training.ema_warmup = False
  config.training.ema_halflife_kimg = 10.0   # ≈ 156 steps of 64 images
  config.training.ema_rampup_ratio = 0.05
  # Heun on Karras' ρ = 7 levels: the paper's sampler. Our 17 Heun steps from 80 to 0.002 and
  # the final x̂₀ = D(x; 0.002) are EDM's 18 levels with the Euler step to σ = 0 (35 evaluations).
  config.training.sampler = 'heun'
  config.training.sample_steps = 17
  config.eval.sampler = 'heun'
  config.eval.sample_steps = 17
  # ...with Karras' churn, the sampler sample.py and evaluate use: at 35 evaluations on 1,797
  # samples (docs/edm.md) churn 10 (γ at its cap √2 − 1) gave FD 0.62, precision 0.80, against
  # 0.85 / 0.79 without churn and 0.76 / 0.80 with churn 3.
  config.eval.churn = 10.0
  return config
