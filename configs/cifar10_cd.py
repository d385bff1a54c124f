"""Consistency distillation of an EDM CIFAR-10 workdir (configs/cifar10_edm.py), with the
settings of Song et al. 2023 (Table 3 and openai/consistency_models_cifar10's
configs/cifar10_ve_cd.py): N = 18 Karras levels between σ 0.002 and 80, one Heun step of the
teacher between neighbours, μ = 0 (the target is the student behind a stop-gradient), batch
512, learning rate 4e-4 with a linear warm-up over 10M images, no gradient clipping, EMA
0.9999, 800k steps; their 1-step FID is 3.55 and 2-step 2.93 (LPIPS distance).

  python train.py --config configs/cifar10_cd.py --workdir gs://bucket/cifar10_cd \
      --config.distill.teacher=gs://bucket/edm_cifar10

Differences: the distance is pseudo-Huber (c = 0.00054·√d, Song & Dhariwal 2023) in place of
LPIPS, whose VGG weights are not fetched at run time; the optimizer is Adam, not RAdam; the
network is the teacher's (our U-Net), not NCSN++.
"""

from configs import cifar10_edm


def get_config():
  config = cifar10_edm.get_config()
  d = config.distill
  d.teacher = '/tmp/cifar10_edm'
  d.method = 'cd'
  d.num_levels = 18
  d.target_decay = 0.0
  d.distance = 'pseudo_huber'
  d.sigma_data = 0.5
  t = config.training
  t.batch_size = 512
  t.num_train_steps = 800_000
  t.ema_halflife_kimg = None
  t.ema_rampup_ratio = None
  t.ema_decay = 0.9999
  t.sampler = 'consistency'
  t.sample_steps = 1
  config.eval.sampler = 'consistency'
  config.eval.sample_steps = 1
  o = config.optimizer
  o.learning_rate = 4e-4
  o.warmup_steps = 10_000_000 // 512
  o.grad_clip = 0.0
  return config
