"""LSUN Church 256×256 as in Ho et al. 2020 (FID 7.89): batch 64, lr 2e-5, 1.2M steps.

  python train.py --config configs/lsun_church.py --workdir gs://bucket/ddpm_church

Needs `lsun/church_outdoor` prepared as array_record in data_dir, at 256×256 (center-cropped).
"""

from configs import celeba_hq256


def get_config():
  config = celeba_hq256.get_config()
  config.data.dataset = 'lsun/church_outdoor'
  config.training.num_train_steps = 1_200_000
  return config
