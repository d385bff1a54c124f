"""EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7, unconditional; FID 1.97 at 35
evaluations with their DDPM++ network) on our U-Net (the DDPM architecture, 35.7M parameters).

  python train.py --config configs/cifar10_edm.py --workdir gs://bucket/edm_cifar10

From the paper: batch 512, Adam at lr 1e-3 (β 0.9/0.999, ε 1e-8) ramped up linearly over the
first 10 Mimg, no gradient clipping, dropout 0.13, EMA half-life 0.5 Mimg with ramp-up ratio
0.05, σ_d = 0.5, ln σ ~ N(−1.2, 1.2²), λ(σ) = (σ² + σ_d²)/(σσ_d)², 200 Mimg of training (390,625
steps), Heun on σ from 80 to 0.002 with ρ = 7, 18 levels (35 evaluations: here 17 steps).

Not reproduced: their network (DDPM++ / SongUNet, 56M parameters, with its own embedding of
c_noise: here our U-Net's sinusoidal embedding of c_noise = ¼ ln σ), their non-leaking
augmentation pipeline (p = 0.12, with the augmentation labels as a conditioning input): only
horizontal flips here; and their mixed-precision settings. Expect a worse FID than the paper's.
Needs cifar10 prepared in the data_dir, as configs/cifar10.py says.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  d = config.diffusion
  d.process = 'edm'
  d.objective = 'edm'
  d.mean_type = 'edm'
  d.sigma_min = 0.002
  d.sigma_max = 80.0
  d.sigma_data = 0.5
  d.p_mean = -1.2
  d.p_std = 1.2
  config.model.dropout = 0.13
  t = config.training
  t.batch_size = 512
  t.num_train_steps = 390_625            # 200 Mimg
  t.checkpoint_every_steps = 10_000
  t.sample_every_steps = 25_000
  t.ema_warmup = False
  t.ema_halflife_kimg = 500.0            # 0.5 Mimg
  t.ema_rampup_ratio = 0.05
  t.sampler = 'heun'
  t.sample_steps = 17            # 17 Heun steps + the final x̂₀: EDM's 18 levels, 35 evaluations
  config.eval.sampler = 'heun'
  config.eval.sample_steps = 17
  o = config.optimizer
  o.learning_rate = 1e-3
  o.warmup_steps = 19_531                # 10 Mimg at batch 512
  o.grad_clip = 0.0                      # none
  return config
