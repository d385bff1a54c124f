"""CelebA-HQ 256×256 as in Ho et al. 2020: 114M-parameter U-Net, batch 64, lr 2e-5.

  python train.py --config configs/celeba_hq256.py --workdir gs://bucket/ddpm_celebahq

Needs the 256×256 CelebA-HQ images prepared as a TFDS dataset (array_record) in data_dir;
the name below is the TFDS builder config for 256×256.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'celeb_a_hq/256'
  config.data.random_flip = True
  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.training.batch_size = 64
  config.training.num_train_steps = 500_000
  config.training.ema_decay = 0.9999
  config.training.sample_every_steps = 50_000
  config.training.num_samples = 16
  config.optimizer.learning_rate = 2e-5
  config.optimizer.warmup_steps = 5000
  return config
