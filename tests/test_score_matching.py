"""Score-matching losses against closed forms: DSM at the exact score of Gaussian data, and
SSM's projections averaging to Hyvärinen's objective on a linear score.

DSM's minimum, derived here. Data x₀ ~ N(μ, s²) per coordinate, x̃ = a x₀ + σ z (a = 1 for VE;
a = α(t) for sub-VP). The marginal is N(aμ, v) with v = a²s² + σ², so the exact score is
s*(x̃) = −(x̃ − aμ)/v. The conditional target g = −z/σ has E[g | x̃] = s*(x̃) (the posterior
mean of the noise is E[z | x̃] = σ(x̃ − aμ)/v), hence, per coordinate,
    E‖s*(x̃) − g‖² = E‖g‖² − E‖s*‖² = 1/σ² − 1/v      (E‖s*‖² = Var(x̃)/v² = 1/v),
and per example with d coordinates and weighting λ:
    E[λ · ½‖s*(x̃) + z/σ‖²] = λ · ½ · d · (1/σ² − 1/v).
A score c·s* adds λ · ½ · d · (c − 1)²/v (the cross term has E[(s* − g)·s*] = 0).

SSM on s(x) = A x + b: ∇ₓ s = A, so Hyvärinen's objective per example is tr(A) + ½‖Ax + b‖²,
which vᵀAv + ½(vᵀs)² and vᵀAv + ½‖s‖² both estimate without bias when E[vvᵀ] = I.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import continuous as ct
from diffusion_jax.process import score_matching as sm

import oracles  # tests/ is on sys.path under pytest's rootdir conftest

MU, S = 0.3, 0.5
D = 8              # coordinates per example, as [B, 2, 4]
N_DSM = 1 << 15    # examples in each DSM Monte-Carlo mean
N_SSM = 50000      # projections per example in each SSM Monte-Carlo mean
Z = 5.0            # the tolerance, in standard errors (tests make up to 10 such checks)


def _mean_se(v):
  """Mean and standard error over axis 0 (float64)."""
  v = np.asarray(v, np.float64)
  return v.mean(0), v.std(0, ddof=1) / np.sqrt(v.shape[0])


def _lam(weighting, sigma):
  return sigma ** 2 if weighting == 'sigma2' else np.ones_like(sigma)


# ------------------------------------------------------------------------------------------
# DSM.
# ------------------------------------------------------------------------------------------


def _gaussian_data(rng, n):
  x0 = MU + S * rng.standard_normal((n, 2, 4))
  z = rng.standard_normal((n, 2, 4))
  return jnp.asarray(x0), jnp.asarray(z)


def _check_minimum_and_margin(loss, loss_scaled, lam, v, sigma, scale):
  """`loss` [N] at s*: mean within Z·SE of the closed form; `loss_scaled` [N] at scale·s*:
  larger by the closed-form excess, a margin far beyond the paired SE."""
  expected = lam * 0.5 * D * (1.0 / sigma ** 2 - 1.0 / v)                  # [N]
  m, se = _mean_se(np.asarray(loss) - expected)
  assert abs(m) < Z * se, (m, se, expected.mean())
  diff = np.asarray(loss_scaled) - np.asarray(loss)                         # [N] paired
  excess = lam * 0.5 * D * (scale - 1.0) ** 2 / v                           # [N]
  dm, dse = _mean_se(diff)
  assert excess.mean() > 8 * dse, (excess.mean(), dm, dse)  # the excess is far beyond noise
  assert abs(dm - excess.mean()) < Z * dse, (dm, excess.mean(), dse)


@pytest.mark.parametrize('weighting', ['sigma2', 'none'])
def test_dsm_ve_reaches_the_analytic_minimum_at_the_exact_score(weighting):
  rng, _ = oracles.new_rng()
  with jax.enable_x64(True):
    x0, z = _gaussian_data(rng, N_DSM)
    sigma = np.exp(rng.uniform(np.log(0.2), np.log(2.0), N_DSM))             # [N]
    v = S ** 2 + sigma ** 2

    def score(c, x, sig):                                                   # c · s*
      return -c * (x - MU) / (S ** 2 + sig[:, None, None] ** 2)

    loss = sm.dsm_loss(functools.partial(score, 1.0), x0, jnp.asarray(sigma), z, weighting)
    loss_scaled = sm.dsm_loss(functools.partial(score, 1.1), x0, jnp.asarray(sigma), z,
                              weighting)
    assert loss.shape == (N_DSM,) and loss.dtype == jnp.float64
    _check_minimum_and_margin(loss, loss_scaled, _lam(weighting, sigma), v, sigma, 1.1)


@pytest.mark.parametrize('weighting', ['sigma2', 'none'])
def test_dsm_subvp_reaches_the_analytic_minimum_at_the_exact_score(weighting):
  rng, _ = oracles.new_rng()
  process = ct.SubVPProcess()
  with jax.enable_x64(True):
    x0, z = _gaussian_data(rng, N_DSM)
    # t ≥ 0.2 keeps σ(t) ≥ 0.34: unweighted, the loss's variance grows as 1/σ⁴.
    t = jnp.asarray(rng.uniform(0.2, 1.0, N_DSM))                           # [N]
    a, sigma = np.asarray(process.alpha(t)), np.asarray(process.sigma(t))
    v = a ** 2 * S ** 2 + sigma ** 2

    def score(c, x, t):                                                     # c · s*
      a, sig = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
      return -c * (x - a * MU) / (a ** 2 * S ** 2 + sig ** 2)

    loss = sm.dsm_loss_process(functools.partial(score, 1.0), process, x0, t, z, weighting)
    loss_scaled = sm.dsm_loss_process(functools.partial(score, 1.1), process, x0, t, z,
                                      weighting)
    assert loss.shape == (N_DSM,)
    _check_minimum_and_margin(loss, loss_scaled, _lam(weighting, sigma), v, sigma, 1.1)


def test_dsm_process_under_ve_is_dsm_at_sigma_of_t():
  rng, _ = oracles.new_rng()
  process = ct.VEProcess(sigma_min=0.01, sigma_max=50.0)
  x0, z = (jnp.asarray(a, jnp.float32) for a in _gaussian_data(rng, 16))
  t = jnp.asarray(rng.uniform(0.0, 1.0, 16), jnp.float32)
  sigma = process.sigma(t)

  def score_t(x, t):  # any score that depends on x and the level
    return jnp.tanh(x) / process.sigma(t)[:, None, None]

  def score_sigma(x, sig):
    return jnp.tanh(x) / sig[:, None, None]

  for w in ('sigma2', 'none'):
    np.testing.assert_allclose(sm.dsm_loss_process(score_t, process, x0, t, z, w),
                               sm.dsm_loss(score_sigma, x0, sigma, z, w), rtol=1e-5)


def test_dsm_jits_and_its_gradient_is_finite_and_matches_the_closed_form():
  """s = θ·s*: E[loss](θ) = const + λ·½·d·(θ − 1)²/v, so dE/dθ = λ·d·(θ − 1)/v."""
  rng, _ = oracles.new_rng()
  with jax.enable_x64(True):
    n = 1 << 14
    x0, z = _gaussian_data(rng, n)
    sigma = jnp.asarray(np.exp(rng.uniform(np.log(0.2), np.log(2.0), n)))
    v = S ** 2 + np.asarray(sigma) ** 2

    def per_example(theta, x0, sigma, z):
      score = lambda x, sig: -theta * (x - MU) / (S ** 2 + sig[:, None, None] ** 2)
      return sm.dsm_loss(score, x0, sigma, z, 'sigma2')

    eager = per_example(0.7, x0, sigma, z)
    jitted = jax.jit(per_example)(0.7, x0, sigma, z)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)

    theta = 0.7
    grad = jax.jit(jax.grad(lambda th: jnp.mean(per_example(th, x0, sigma, z))))(theta)
    per = jax.jacfwd(per_example)(theta, x0, sigma, z)                      # [n]
    assert np.isfinite(grad) and grad < 0
    np.testing.assert_allclose(grad, np.mean(per), rtol=1e-10)
    expected = np.asarray(sigma) ** 2 * D * (theta - 1.0) / v               # [n]
    m, se = _mean_se(np.asarray(per) - expected)
    assert abs(m) < Z * se, (m, se, expected.mean())


# ------------------------------------------------------------------------------------------
# SSM.
# ------------------------------------------------------------------------------------------


def _linear_score(rng, b=5):
  """s(x) = A x + b on x [B, 2, 3] (d = 6), A random and not symmetric; and x."""
  d = 6
  a = 0.5 * rng.standard_normal((d, d))
  assert not np.allclose(a, a.T)
  bias = 3.0 * rng.standard_normal(d)
  x = rng.standard_normal((b, 2, 3))
  a_j, bias_j = jnp.asarray(a), jnp.asarray(bias)

  def score(x):
    flat = x.reshape(x.shape[0], -1)
    return (flat @ a_j.T + bias_j).reshape(x.shape)

  score.a, score.bias = a, bias  # for closed forms of the estimators' variances
  s = x.reshape(b, -1) @ a.T + bias
  exact = np.trace(a) + 0.5 * np.sum(s ** 2, -1)                            # [B]
  return score, jnp.asarray(x), exact


def _ssm_draws(score, x, seed, n, *configs):
  """n independent `ssm_loss` draws per config (a dict of its options), in one jitted call:
  a tuple of `[n, B]` arrays."""
  keys = jax.random.split(jax.random.key(seed), n)

  def one(k):
    return tuple(sm.ssm_loss(score, x, jax.random.fold_in(k, i), **kw)
                 for i, kw in enumerate(configs))

  return tuple(np.asarray(d) for d in jax.jit(jax.vmap(one))(keys))


def _quadratic_form_moments(q, projection):
  """Exact variance and fourth central moment of vᵀQv, Q symmetric `[..., d, d]`.

  Gaussian v: vᵀQv = Σᵢ λᵢ χ²₁ over Q's eigenvalues, with cumulants κ_r = 2^(r−1)(r−1)! Σλⁱʳ,
  so the variance is κ₂ = 2Σλ² and μ₄ = κ₄ + 3κ₂² with κ₄ = 48Σλ⁴. Rademacher v: the mean
  over all 2^d sign vectors (d is small here), which is the distribution itself.
  """
  q = np.asarray(q, np.float64)
  if projection == 'gaussian':
    lam = np.linalg.eigvalsh(q)                                             # [..., d]
    k2 = 2.0 * np.sum(lam ** 2, -1)
    k4 = 48.0 * np.sum(lam ** 4, -1)
    return k2, k4 + 3.0 * k2 ** 2
  d = q.shape[-1]
  signs = np.array(list(itertools.product((-1.0, 1.0), repeat=d)))         # [2^d, d]
  values = np.einsum('ki,...ij,kj->...k', signs, q, signs)                 # [..., 2^d]
  centred = values - values.mean(-1, keepdims=True)
  return np.mean(centred ** 2, -1), np.mean(centred ** 4, -1)


def test_the_quadratic_form_moments_in_cases_known_by_hand():
  """The closed forms the SSM variance check relies on. Gaussian v: λ(χ²₁ − 1) has variance
  2λ² and μ₄ = 60λ⁴ (kurtosis 15); a sum of independent such terms, with central moments
  m₂ = 2, m₄ = 60, has μ₄ = Σ 60λᵢ⁴ + 6 Σ_{i<j} 4λᵢ²λⱼ², whatever basis Q is written in.
  Rademacher v: Q with Q₁₂ = Q₂₁ = c gives 2c·v₁v₂ = ±2c, so variance 4c², μ₄ = 16c⁴."""
  lam = np.array([1.5, -0.5, 0.25])
  rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
  q = rotation @ np.diag(lam) @ rotation.T
  var, mu4 = _quadratic_form_moments(np.stack([np.diag([1.0, 0.0, 0.0]), q]), 'gaussian')
  pairs = sum(lam[i] ** 2 * lam[j] ** 2 for i in range(3) for j in range(i + 1, 3))
  np.testing.assert_allclose(var, [2.0, 2.0 * np.sum(lam ** 2)], rtol=1e-12)
  np.testing.assert_allclose(mu4, [60.0, 60.0 * np.sum(lam ** 4) + 24.0 * pairs], rtol=1e-12)
  c = 0.7
  q = np.zeros((4, 4))
  q[0, 1] = q[1, 0] = c
  q[2, 2] = 3.0  # v₃² = 1: a constant, no spread
  var, mu4 = _quadratic_form_moments(q, 'rademacher')
  np.testing.assert_allclose([var, mu4], [4.0 * c ** 2, 16.0 * c ** 4], rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize('projection', ['rademacher', 'gaussian'])
def test_ssm_is_unbiased_for_hyvarinen_and_vr_has_lower_variance(projection):
  rng, seed = oracles.new_rng()
  with jax.enable_x64(True):
    score, x, exact = _linear_score(rng)
    plain, vr = _ssm_draws(score, x, seed, N_SSM, dict(projection=projection),
                           dict(projection=projection, variance_reduced=True))
  assert plain.shape == (N_SSM, x.shape[0])
  for draws in (plain, vr):
    m, se = _mean_se(draws)
    assert np.all(np.abs(m - exact) < Z * se), (m, exact, se)
  # Each estimate is a quadratic form vᵀQv (plus a constant): Q = M + ½ssᵀ plain, Q = M for
  # SSM-VR, with M = (A + Aᵀ)/2. The sample variances must match the exact variances within
  # Z standard errors, the standard error of a sample variance coming from the form's exact
  # fourth central moment (`_quadratic_form_moments`): vᵀQv is heavy-tailed (kurtosis up to
  # 15 for Gaussian v, that of χ²₁, when ½ssᵀ dominates), so a fixed relative tolerance would
  # be fewer standard errors than it looks. And the scores being large against A, ½(vᵀs)²'s
  # share dominates what SSM-VR removes.
  a = np.asarray(score.a, np.float64)
  sym = 0.5 * (a + a.T)
  s = np.asarray(x, np.float64).reshape(x.shape[0], -1) @ a.T + np.asarray(score.bias)  # [B, d]
  q_plain = sym[None] + 0.5 * s[:, :, None] * s[:, None, :]                 # [B, d, d]
  q_vr = np.broadcast_to(sym, q_plain.shape)
  want = {}
  for name, draws, q in (('plain', plain, q_plain), ('vr', vr, q_vr)):
    var, mu4 = _quadratic_form_moments(q, projection)                       # [B], [B]
    n = draws.shape[0]
    se = np.sqrt(mu4 / n - var ** 2 * (n - 3) / (n * (n - 1)))  # of the unbiased sample var
    got = np.asarray(draws, np.float64).var(0, ddof=1)
    assert np.all(np.abs(got - var) < Z * se), (name, got, var, se, seed)
    want[name] = var
  want_plain, want_vr = want['plain'], want['vr']
  assert want_vr.sum() < 0.5 * want_plain.sum(), (want_vr, want_plain, seed)


@pytest.mark.slow
def test_ssm_averages_its_projections():
  """M projections: still unbiased, with 1/M of one projection's variance."""
  rng, seed = oracles.new_rng()
  m_proj, n = 8, 4000
  with jax.enable_x64(True):
    score, x, exact = _linear_score(rng, b=3)
    one, many = _ssm_draws(score, x, seed, n, {}, dict(num_projections=m_proj))
  m, se = _mean_se(many)
  assert np.all(np.abs(m - exact) < Z * se), (m, exact, se)
  ratio = many.var(0) * m_proj / one.var(0)
  assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_ssm_vr_with_rademacher_is_exact_for_an_isotropic_jacobian_under_jit():
  """s(x) = c·x + b: vᵀ(cI)v = c·d for every ±1 vector, so SSM-VR is tr + ½‖s‖² exactly."""
  rng, seed = oracles.new_rng()
  c = 0.7
  bias = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((5, 2, 4)), jnp.float32)
  score = lambda x: c * x + bias
  loss = jax.jit(functools.partial(sm.ssm_loss, score, num_projections=3,
                                   projection='rademacher', variance_reduced=True))(
                                       x, jax.random.key(seed))
  assert loss.shape == (5,) and loss.dtype == jnp.float32
  s = c * np.asarray(x, np.float64) + np.asarray(bias, np.float64)
  np.testing.assert_allclose(loss, c * D + 0.5 * np.sum(s ** 2, (1, 2)), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------


def test_unknown_options_are_one_line_errors():
  x = jnp.zeros((2, 3))
  sigma = jnp.ones(2)
  score = lambda x, s: x
  with pytest.raises(ValueError) as e:
    sm.dsm_loss(score, x, sigma, x, weighting='snr')
  oracles.assert_one_line_error(e.value, "'snr'", "'sigma2'", "'none'")
  with pytest.raises(ValueError) as e:
    sm.dsm_loss_process(score, ct.VEProcess(), x, sigma, x, weighting='sigma')
  oracles.assert_one_line_error(e.value, "'sigma'", "'sigma2'", "'none'")
  with pytest.raises(ValueError) as e:
    sm.ssm_loss(lambda x: x, x, jax.random.key(0), projection='sphere')
  oracles.assert_one_line_error(e.value, "'sphere'", "'rademacher'", "'gaussian'")
  with pytest.raises(ValueError) as e:
    sm.ssm_loss(lambda x: x, x, jax.random.key(0), num_projections=0)
  oracles.assert_one_line_error(e.value, 'num_projections', '0')
