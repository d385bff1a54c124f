"""A small classifier of the 8×8 digits: the feature network of an offline "digits FID".

An MLP 64 → 256 → 128 → 10 on pixels scaled to [0, 1]. The 128-d penultimate activations
are the features for FID and precision/recall; the logits give the Inception Score (of 10
classes). `train(images, labels, seed=...)` fits it in a few seconds on a CPU and is
deterministic given the seed. No IO: `diffusion_jax.evaluation.features` caches the parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
  """uint8 or float `[N, 8, 8, 1]` in [0, 255] → (features `[N, 128]`, logits `[N, 10]`)."""
  hidden: tuple[int, ...] = (256, 128)
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images):
    h = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0  # [N, 64]
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f'dense_{i}')(h))
    return h, nn.Dense(self.num_classes, name='logits')(h)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How the classifier is fitted; part of its cache key (`key()`)."""
  steps: int = 800
  batch_size: int = 128
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  pixel_noise: float = 8.0   # std of Gaussian noise added to the 0..255 pixels while training

  def key(self) -> str:
    return (f'mlp256x128_s{self.steps}_b{self.batch_size}_lr{self.learning_rate:g}'
            f'_wd{self.weight_decay:g}_n{self.pixel_noise:g}')


def train(images: np.ndarray, labels: np.ndarray, *, seed: int = 0,
          cfg: TrainConfig = TrainConfig()):
  """Fits the classifier to uint8 `images [N, 8, 8, 1]` and int `labels [N]`; returns params.

  One compiled `lax.scan` over all steps; minibatches are drawn with replacement from
  `fold_in(key, step)`. The small pixel noise makes the features less brittle on generated
  images, which are not exactly on the 17 gray levels of the data.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
    raise ValueError(f'need images [N, 8, 8, 1] and labels [N], got {images.shape}, '
                     f'{labels.shape}')
  model = DigitsClassifier()
  key = jax.random.PRNGKey(seed)
  init_key, data_key = jax.random.split(key)
  params = model.init(init_key, images[:1])['params']
  tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

  def loss_fn(p, x, y):
    _, logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, i):
    p, opt_state = carry
    k_idx, k_noise = jax.random.split(jax.random.fold_in(data_key, i))
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
    x = images[idx] + cfg.pixel_noise * jax.random.normal(k_noise, (cfg.batch_size,)
                                                          + IMAGE_SHAPE)
    loss, grads = jax.value_and_grad(loss_fn)(p, jnp.clip(x, 0.0, 255.0), labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  @jax.jit
  def fit(p):
    (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(cfg.steps))
    return p, losses

  params, _ = fit(params)
  return params


def apply(params, images) -> tuple[jax.Array, jax.Array]:
  """(features `[N, 128]`, logits `[N, 10]`) of uint8 images `[N, 8, 8, 1]`."""
  return DigitsClassifier().apply({'params': params}, images)


def accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
  _, logits = jax.jit(apply)(params, jnp.asarray(images))
  return float(np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)))
