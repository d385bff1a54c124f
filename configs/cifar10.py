"""CIFAR-10 as in Ho et al. 2020 (FID 3.17): 35.7M-parameter U-Net, 800k steps at batch 128.

  python train.py --config configs/cifar10.py --workdir gs://bucket/ddpm_cifar10

Needs cifar10 prepared in the data_dir (nothing is downloaded at run time):
  tfds build cifar10 --file_format=array_record --data_dir=DATA_DIR
or, with the TensorFlow extra installed, an existing TFRecord copy is read through tfds.load.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.random_flip = True
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.ema_decay = 0.9999
  config.training.sample_every_steps = 50_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.optimizer.grad_clip = 1.0
  return config
