"""LSUN Cat 256×256 as in Ho et al. 2020: batch 64, lr 2e-5, dropout 0.1 (1.76M steps).

  python train.py --config configs/lsun_cat.py --workdir gs://bucket/ddpm_cat

Needs `lsun/cat` prepared as array_record in data_dir, at 256×256 (center-cropped).
"""

from configs import celeba_hq256


def get_config():
  config = celeba_hq256.get_config()
  config.data.dataset = 'lsun/cat'
  config.model.dropout = 0.1
  config.training.num_train_steps = 1_760_000
  return config
