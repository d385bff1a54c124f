"""Feature extractors for FID, Inception Score and precision/recall, and cached reference
statistics of the real data.

A `FeatureExtractor` maps uint8 images `[N, H, W, C]` to (features `[N, D]`, logits `[N, K]`)
and has a `name` that identifies its weights (the cache key). Two are built in:

* `digits`: the small classifier of `models/digits_classifier.py`, trained on the digits
  train split on first use (seconds, deterministic given the seed) and cached in
  `DATA_DIR/diffusion_jax/`. D = 128, K = 10. Offline, for the embedded digits only.
* `inception`: the FID Inception-v3 (`models/inception.py`, D = 2048, K = 1008) with weights
  from a user-supplied .npz; nothing is downloaded.

`reference_stats(extractor, dataset, data_dir, split)` computes the mean and covariance of
the real split's features once and caches them, with a subset of the features for
precision/recall, in `DATA_DIR/diffusion_jax/reference_<extractor>_<dataset>_<split>.npz`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import traverse_util

from diffusion_jax import fid
from diffusion_jax.data import datasets
from diffusion_jax.data import digits as digits_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.models import digits_classifier
from diffusion_jax.models import inception

# Precision/recall compare against at most this many real feature vectors (evenly spaced in
# the split): k-NN radii cost O(N²).
MAX_PR_REFERENCE = 10_000


FeatureKind = datasets.FeatureKind


class FeatureExtractor(Protocol):
  """uint8 images `[N, H, W, C]` → (features `[N, D]`, logits `[N, K]`), NumPy float."""
  name: str

  def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class JaxExtractor:
  """`apply(variables, images [B, ...]) -> (features, logits)`, jitted, in fixed-size batches.

  The last batch is padded, so one batch shape is compiled; the weights are an argument,
  not constants folded into the program. `image_shape` (H, W, C), when set, is checked.
  """
  name: str
  apply: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  variables: Any
  batch_size: int
  image_shape: tuple[int, int, int] | None = None

  def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f'{self.name}: need uint8 images [N, H, W, C], got {images.dtype} '
                       f'{images.shape}')
    if self.image_shape is not None and images.shape[1:] != tuple(self.image_shape):
      raise ValueError(f'{self.name}: need images [N, {", ".join(map(str, self.image_shape))}]'
                       f', got {images.shape}')
    n, b = images.shape[0], self.batch_size
    feats, logits = [], []
    for i in range(0, n, b):
      chunk = images[i:i + b]
      pad = b - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
      f, l = jax.device_get(self.apply(self.variables, jnp.asarray(chunk)))
      feats.append(np.asarray(f[:b - pad], np.float64))
      logits.append(np.asarray(l[:b - pad], np.float64))
    return np.concatenate(feats), np.concatenate(logits)


# ------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------


def cache_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """`DATA_DIR/diffusion_jax`, DATA_DIR being the TFDS data_dir (None: TFDS's default)."""
  root = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
  return os.path.join(os.path.expanduser(root), 'diffusion_jax')


def _save_npz(path: str, **arrays) -> None:
  """Writes atomically: a reader never sees a half-written cache file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_split(dataset: str, data_dir, split: str,
               batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a split, in order: uint8 images `[N, H, W, C]` and int labels `[N]`."""
  images, labels = [], []
  for batch in input_pipeline.create_eval_iterator(
      dataset, data_dir, global_batch_size=batch_size, split=split, prefetch_batches=0):
    keep = batch['mask']
    # The pipeline scales u ↦ u/127.5 − 1 in float32; this inverts it exactly.
    images.append(np.clip(np.round((batch['image'][keep] + 1.0) * 127.5), 0, 255)
                  .astype(np.uint8))
    labels.append(batch['label'][keep])
  return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------------------------
# Extractors.
# ------------------------------------------------------------------------------------------


def digits_extractor(data_dir, *, seed: int = 0,
                     cfg: digits_classifier.TrainConfig = digits_classifier.TrainConfig()
                     ) -> tuple[JaxExtractor, float]:
  """The digits classifier as an extractor, and its accuracy on the digits test split.

  Trained on the train split on first use and cached as
  `DATA_DIR/diffusion_jax/digits_classifier_<settings>_seed<seed>.npz`.
  """
  name = f'digits_classifier_{cfg.key()}_seed{seed}'
  path = os.path.join(cache_dir(data_dir), f'{name}.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files if k != 'test_accuracy'}
      test_accuracy = float(f['test_accuracy'])
    params = traverse_util.unflatten_dict(flat, sep='/')
  else:
    images, labels = load_split(digits_lib.NAME, data_dir, 'train')
    params = jax.device_get(digits_classifier.train(images, labels, seed=seed, cfg=cfg))
    test_accuracy = digits_classifier.accuracy(params, *load_split(digits_lib.NAME, data_dir,
                                                                   'test'))
    _save_npz(path, test_accuracy=np.float64(test_accuracy),
              **traverse_util.flatten_dict(params, sep='/'))
  return JaxExtractor(name=name, apply=jax.jit(digits_classifier.apply),
                      variables=jax.tree.map(jnp.asarray, params), batch_size=500,
                      image_shape=digits_classifier.IMAGE_SHAPE), test_accuracy


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()[:12]


def inception_extractor(weights_path, *, batch_size: int = 50) -> JaxExtractor:
  """The FID Inception-v3 with the weights in `weights_path` (see `models/inception.py`)."""
  variables = inception.load_variables(weights_path)
  model = inception.InceptionV3()
  apply = jax.jit(lambda v, x: model.apply(v, inception.preprocess(x)))
  return JaxExtractor(name=f'inception_{_file_digest(os.fspath(weights_path))}', apply=apply,
                      variables=variables, batch_size=batch_size)


def make_extractor(kind: str | FeatureKind, *, dataset: str, data_dir,
                   inception_weights=None) -> FeatureExtractor:
  """The extractor of `kind` ('digits' | 'inception') for `dataset`; errors are one line."""
  kind = FeatureKind.parse(kind)
  if kind is FeatureKind.DIGITS:
    if datasets.describe(dataset).features is not FeatureKind.DIGITS:
      raise ValueError(f"features 'digits' work on the digits dataset only, not {dataset!r}; "
                       'use --features=inception --inception_weights=PATH')
    return digits_extractor(data_dir)[0]
  return inception_extractor(inception_weights)


# ------------------------------------------------------------------------------------------
# Reference statistics.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Gaussian statistics of a real split's features, and features for precision/recall."""
  mu: np.ndarray              # [D] float64
  sigma: np.ndarray           # [D, D] float64
  features: np.ndarray        # [min(N, MAX_PR_REFERENCE), D] float32
  num_examples: int


def reference_stats(extractor: FeatureExtractor, dataset: str, data_dir,
                    split: str = 'train') -> ReferenceStats:
  """Statistics of the real `split`, computed once and cached next to the data."""
  safe_split = split.replace('/', '_').replace(':', '-').replace('%', 'pct')
  path = os.path.join(cache_dir(data_dir),
                      f'reference_{extractor.name}_{dataset}_{safe_split}.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      return ReferenceStats(mu=f['mu'], sigma=f['sigma'], features=f['features'],
                            num_examples=int(f['num_examples']))
  images, _ = load_split(dataset, data_dir, split)
  feats, _ = extractor.features_and_logits(images)
  mu, sigma = fid.gaussian_stats(feats)
  keep = np.unique(np.linspace(0, len(feats) - 1, min(len(feats), MAX_PR_REFERENCE))
                   .round().astype(int))
  stats = ReferenceStats(mu=mu, sigma=sigma, features=feats[keep].astype(np.float32),
                         num_examples=len(feats))
  _save_npz(path, mu=stats.mu, sigma=stats.sigma, features=stats.features,
            num_examples=np.int64(stats.num_examples))
  return stats
