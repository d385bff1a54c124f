"""A tiny config for tests: seconds per step on a CPU, nothing written but checkpoints.

  python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.diffusion.num_timesteps = 100
  config.training.batch_size = 16
  config.training.num_train_steps = 4
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 0
  config.training.ema_decay = 0.9
  config.optimizer.warmup_steps = 2
  config.optimizer.learning_rate = 1e-3
  return config
