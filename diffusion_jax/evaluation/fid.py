"""Sample-quality metrics on feature vectors: Fréchet distance (FID), Inception Score and
precision/recall (Kynkäänniemi et al. 2019).

Pure NumPy in float64, no IO: features come from any extractor (`diffusion_jax.evaluation.features`).

* `gaussian_stats(features) -> (mu, sigma)`; `frechet_distance(mu1, sigma1, mu2, sigma2)`:
  ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½. The trace of the square root is taken as
  tr (Σ₁^½ Σ₂ Σ₁^½)^½ (the same number, since Σ₁Σ₂ is similar to the symmetric positive
  semi-definite Σ₁^½ Σ₂ Σ₁^½), with symmetric eigendecompositions only: no complex residue.
* `inception_score(logits)`: exp E_x KL(p(y|x) ‖ p(y)), the mean and std over splits.
* `precision_recall(real, fake, k=3)`: the fraction of fake points inside the union of the
  k-NN balls of the real points, and the other way round.
"""

from __future__ import annotations

import numpy as np


def _as_features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name} must be features [N, D], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} holds non-finite values')
  return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and covariance `[D, D]` (unbiased, float64) of features `[N, D]`, N ≥ 2."""
  x = _as_features(features, 'features')
  if x.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors for a covariance, got {x.shape[0]}')
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
  """The PSD square root of a symmetric matrix; negative round-off eigenvalues become 0."""
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr (Σ₁Σ₂)^½ for symmetric PSD Σ₁, Σ₂, as Σ sqrt(eig(Σ₁^½ Σ₂ Σ₁^½))."""
  s1 = _sym_sqrt(sigma1)
  m = s1 @ sigma2 @ s1
  w = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

  Covariances must be symmetric positive semi-definite (as from `gaussian_stats`); they are
  symmetrised against round-off. Eigenvalues that round-off makes slightly negative are
  taken as 0. Raises ValueError on shape mismatch, non-finite input, or a covariance with a
  clearly negative eigenvalue.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0] if mu1.ndim == 1 else -1
  if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'need mu [D] and sigma [D, D] for both sets, got {mu1.shape}, '
                     f'{sigma1.shape}, {mu2.shape}, {sigma2.shape}')
  for name, a in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f'{name} holds non-finite values')
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2.0, (sigma2 + sigma2.T) / 2.0
  for name, s in (('sigma1', sigma1), ('sigma2', sigma2)):
    w = np.linalg.eigvalsh(s)
    if w.size and w.min() < -1e-6 * max(1.0, abs(w.max())):
      raise ValueError(f'{name} is not positive semi-definite (eigenvalue {w.min():.3g})')
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1,
                                                                                   sigma2)
  return float(max(fd, 0.0))  # ≥ 0 exactly; round-off can leave −1e-13.


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score of class logits `[N, K]`: (mean, std) of exp E KL(p(y|x) ‖ p(y)) over
  `num_splits` consecutive, equal splits (the last N mod num_splits rows are dropped).

  Ranges from 1 (every p(y|x) the same) to K (confident and uniformly spread over classes).
  """
  logits = _as_features(logits, 'logits')
  n = logits.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f'num_splits must be in [1, {n}], got {num_splits}')
  size = n // num_splits
  scores = []
  for s in range(num_splits):
    log_p = _log_softmax(logits[s * size:(s + 1) * size])  # [n_s, K] log p(y|x)
    p = np.exp(log_p)
    log_marginal = np.log(np.maximum(p.mean(axis=0, keepdims=True), np.finfo(np.float64).tiny))
    kl = np.sum(np.where(p > 0, p * (log_p - log_marginal), 0.0), axis=1)  # [n_s]
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """‖a_i − b_j‖² `[len(a), len(b)]`, clipped at 0 against round-off."""
  d = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
  """Squared distance of each point `[N]` to its k-th nearest other point of the same set."""
  x = _as_features(features, 'features')
  if not 1 <= k < x.shape[0]:
    raise ValueError(f'k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} points, got {k}')
  radii = np.empty(x.shape[0])
  for i in range(0, x.shape[0], batch_size):
    d = _squared_distances(x[i:i + batch_size], x)
    # The k-th smallest among the others is the (k+1)-th smallest counting the point itself.
    radii[i:i + batch_size] = np.partition(d, k, axis=1)[:, k]
  return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray,
              batch_size: int) -> float:
  """Fraction of `queries` within distance radius_j of some manifold point j."""
  inside = 0
  for i in range(0, queries.shape[0], batch_size):
    d = _squared_distances(queries[i:i + batch_size], manifold)
    # Exact ties (a query equal to a manifold point at radius 0) count as inside.
    inside += int(np.sum(np.any(d <= radii[None, :] * (1 + 1e-9) + 1e-12, axis=1)))
  return inside / queries.shape[0]


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real`.

  precision: the fraction of fake points inside some real point's ball, whose radius is the
  distance to its k-th nearest real neighbour; recall: the same with the roles swapped.
  """
  real, fake = _as_features(real, 'real'), _as_features(fake, 'fake')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'real and fake features differ in dimension: {real.shape} vs '
                     f'{fake.shape}')
  precision = _coverage(real, knn_radii(real, k, batch_size), fake, batch_size)
  recall = _coverage(fake, knn_radii(fake, k, batch_size), real, batch_size)
  return precision, recall
