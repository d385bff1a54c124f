"""Sample-quality metrics against independent float64 computations, and the feature networks'
shapes (no weights are available offline: the Inception network is only built abstractly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special
from scipy.spatial import distance
from scipy.stats import ortho_group

from diffusion_jax.evaluation import fid
from diffusion_jax.models import digits_classifier
from diffusion_jax.models import inception


def _random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / d


def _scipy_fd(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  assert np.max(np.abs(covmean.imag)) < 1e-6  # SciPy's residue on these well-posed cases
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2.0 * np.trace(covmean.real))


# ------------------------------------------------------------------------------------------
# Fréchet distance.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('d', [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_cov(rng, d) + 0.1 * np.eye(d), _random_cov(rng, d) + 0.1 * np.eye(d)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                             _scipy_fd(mu1, s1, mu2, s2), rtol=1e-9)


def test_frechet_distance_closed_form_for_commuting_covariances():
  # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ: FD = ‖μ₁ − μ₂‖² + Σ (√a − √b)², also with a zero
  # eigenvalue (a singular covariance, as with fewer samples than dimensions).
  d = 12
  rng = np.random.default_rng(0)
  q = ortho_group.rvs(d, random_state=1)
  a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
  a[0] = 0.0
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).standard_normal((500, 64)) * 3.0 + 1.0
  mu, sigma = fid.gaussian_stats(x)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x.T))


def test_frechet_distance_of_low_rank_covariances_is_finite_and_matches_the_formula():
  # 20 samples in 64 dimensions: both covariances are singular; √ of round-off negative
  # eigenvalues must not produce NaN or a complex number.
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
  got = fid.frechet_distance(*fid.gaussian_stats(x), *fid.gaussian_stats(y))
  (m1, s1), (m2, s2) = fid.gaussian_stats(x), fid.gaussian_stats(y)
  # tr (Σ₁Σ₂)^½ = Σ √eig(Σ₁Σ₂): the eigenvalues of a product of PSD matrices are ≥ 0.
  eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
  want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_frechet_distance_rejects_bad_input():
  eye = np.eye(3)
  with pytest.raises(ValueError, match='shape|sigma'):
    fid.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='positive semi-definite'):
    fid.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
  with pytest.raises(ValueError, match='non-finite'):
    fid.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)


# ------------------------------------------------------------------------------------------
# Inception Score.
# ------------------------------------------------------------------------------------------


def test_inception_score_closed_forms():
  k = 7
  assert fid.inception_score(np.zeros((70, k)), num_splits=1) == pytest.approx((1.0, 0.0))
  # Confident and uniformly spread: IS = K, in every split.
  one_hot = np.tile(np.eye(k) * 200.0, (10, 1))  # [70, K], classes 0..K−1 in turn
  mean, std = fid.inception_score(one_hot, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
  # Confident but all the same class: IS = 1.
  assert fid.inception_score(np.tile(np.eye(k)[:1] * 200.0, (30, 1)), 1)[0] == pytest.approx(1)


def test_inception_score_matches_entropy_form():
  # IS = exp(H(p(y)) − E_x H(p(y|x))), computed with SciPy.
  logits = np.random.default_rng(0).standard_normal((400, 10)) * 3
  p = scipy.special.softmax(logits, axis=1)
  want = np.exp(scipy.stats.entropy(p.mean(0)) - np.mean(scipy.stats.entropy(p, axis=1)))
  assert fid.inception_score(logits, num_splits=1)[0] == pytest.approx(want, rel=1e-10)
  splits = [np.exp(scipy.stats.entropy(q.mean(0)) - np.mean(scipy.stats.entropy(q, axis=1)))
            for q in np.split(p, 4)]
  np.testing.assert_allclose(fid.inception_score(logits, num_splits=4),
                             (np.mean(splits), np.std(splits)), rtol=1e-10)


# ------------------------------------------------------------------------------------------
# Precision and recall.
# ------------------------------------------------------------------------------------------


def _brute_precision(real, fake, k):
  d_rr = distance.cdist(real, real)
  radii = np.sort(d_rr, axis=1)[:, k]
  return float(np.mean(np.any(distance.cdist(fake, real) <= radii[None], axis=1)))


def test_precision_recall_identical_far_and_brute_force():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((200, 8))
  assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
  assert fid.precision_recall(real, real + 100.0) == (0.0, 0.0)
  # Half the fake points are real points, half are far away: precision 1/2.
  fake = np.concatenate([real[:100], real[100:] + 100.0])
  assert fid.precision_recall(real, fake)[0] == 0.5
  fake = rng.standard_normal((150, 8)) * 1.3 + 0.3
  p, r = fid.precision_recall(real, fake, k=3, batch_size=64)
  assert p == pytest.approx(_brute_precision(real, fake, 3), abs=1e-12)
  assert r == pytest.approx(_brute_precision(fake, real, 3), abs=1e-12)
  assert 0.0 < p < 1.0 and 0.0 < r < 1.0


def test_knn_radii_exclude_the_point_itself():
  x = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_allclose(fid.knn_radii(x, k=1), np.array([1.0, 1.0, 2.0, 4.0]) ** 2)
  np.testing.assert_allclose(fid.knn_radii(x, k=2), np.array([3.0, 2.0, 3.0, 6.0]) ** 2)


# ------------------------------------------------------------------------------------------
# Feature networks.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inception_builds_with_the_fid_output_shapes():
  model = inception.InceptionV3()
  x = jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32)
  (pool3, logits), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x), x)
  assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params']))
  # torchvision's Inception-v3 has 27,161,264 parameters; without its aux head (3,326,696)
  # that is 23,834,568 for 1000 classes; FID's has 8 more classes of 2048 weights + 1 bias.
  assert n == 27_161_264 - 3_326_696 + 8 * 2049
  shapes = inception.expected_shapes()
  assert len(shapes) == 472
  assert shapes['params/Mixed_7c/branch_pool/conv/kernel'] == (1, 1, 2048, 192)
  assert shapes['batch_stats/Conv2d_1a_3x3/bn/var'] == (32,)
  # Preprocessing takes uint8 images of any size, gray or RGB.
  pre = jax.eval_shape(inception.preprocess, jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.uint8))
  assert pre.shape == (2, 299, 299, 3)


def test_inception_weights_missing_file_names_the_flag(tmp_path):
  for path in (None, str(tmp_path / 'nope.npz')):
    with pytest.raises(FileNotFoundError, match='--inception_weights'):
      inception.load_variables(path)
  bad = tmp_path / 'bad.npz'
  np.savez(bad, something=np.zeros(3))
  with pytest.raises(ValueError, match='not an FID Inception-v3 weights file'):
    inception.load_variables(str(bad))


def test_torch_state_dict_conversion_covers_every_variable():
  # A state dict with pytorch-fid's names and layouts, as zero-strided views (no memory).
  shapes = inception.expected_shapes()
  torch_sd = {}
  for key, shape in shapes.items():
    collection, *path, leaf = key.split('/')
    name = '.'.join(path)
    if path == ['fc']:
      torch_sd[f'fc.{"weight" if leaf == "kernel" else "bias"}'] = np.broadcast_to(
          np.float32(0), shape[::-1] if leaf == 'kernel' else shape)
    elif leaf == 'kernel':
      kh, kw, cin, cout = shape
      torch_sd[f'{name}.weight'] = np.broadcast_to(np.float32(0), (cout, cin, kh, kw))
    else:
      torch_leaf = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                    'var': 'running_var'}[leaf]
      torch_sd[f'{name}.{torch_leaf}'] = np.broadcast_to(np.float32(0), shape)
      torch_sd[f'{name}.num_batches_tracked'] = np.zeros((), np.int64)
  converted = inception.convert_torch_state_dict(torch_sd)
  assert {k: v.shape for k, v in converted.items()} == shapes


def test_digits_classifier_shapes():
  (f, l), params = jax.eval_shape(
      lambda x: digits_classifier.DigitsClassifier().init_with_output(jax.random.PRNGKey(0), x),
      jax.ShapeDtypeStruct((5, 8, 8, 1), jnp.uint8))
  assert f.shape == (5, 128) and l.shape == (5, 10)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  assert n == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
