"""LSUN Bedroom 256×256 as in Ho et al. 2020: batch 64, lr 2e-5 (1.15M steps reported).

  python train.py --config configs/lsun_bedroom.py --workdir gs://bucket/ddpm_bedroom

Needs `lsun/bedroom` prepared as array_record in data_dir, at 256×256 (center-cropped).
"""

from configs import celeba_hq256


def get_config():
  config = celeba_hq256.get_config()
  config.data.dataset = 'lsun/bedroom'
  config.training.num_train_steps = 1_150_000
  return config
