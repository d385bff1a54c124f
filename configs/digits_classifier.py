"""A noise-conditional classifier p(y | x_t) of the digits default's process, for classifier
guidance (docs/controllable.md):

  python train.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier
  python sample.py --workdir /tmp/digits --classifier /tmp/digits_classifier \\
      --classifier_scale 2 --label 3

The network is the encoder half of the digits U-Net (its downsampling path and middle) with a
mean-pooled linear head: diffusion.objective 'classifier' gives it `model.head='classifier'`
and one logit per class. It is trained with cross-entropy at t ~ U(t_min, 1) of the same
process as configs/digits.py (linear betas, T = 1000), so guidance reads it at any sampler's
times. The same loop, checkpoints and resume as a diffusion model; it draws no samples.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.objective = 'classifier'
  config.training.num_train_steps = 1500
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 0
  config.eval.every_steps = 0
  return config
