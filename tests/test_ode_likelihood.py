"""PF-ODE likelihood on correlated Gaussian data x₀ ~ N(μ, Σ), D = 4, where p_t is
N(αμ, α²Σ + σ²I) and the exact denoiser is μ + αΣ(α²Σ + σ²I)⁻¹(x_t − αμ). Σ is not diagonal,
so Hutchinson's estimate of the divergence is genuinely noisy (for a diagonal Jacobian a
Rademacher probe is exact)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import continuous as ct
from diffusion_jax.sampling import likelihood as ol

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

T = 1000
D = oracles.CORRELATED_D  # the data, Σ, p_t and the exact denoiser: tests/oracles.py


def _log_normal(x, mean, cov):
  """Per-row log N(x; mean, cov) in float64."""
  diff = x - mean
  _, logdet = np.linalg.slogdet(cov)
  maha = np.einsum('bi,ij,bj->b', diff, np.linalg.inv(cov), diff)
  return -0.5 * (maha + logdet + D * math.log(2 * math.pi))


def _exact_prior(p):
  return oracles.gaussian_log_density(*oracles.correlated_marginal(p, 1.0))


def _data(p, seed, b):
  mean, cov = oracles.correlated_marginal(p, p.t_min)
  return np.random.default_rng(seed).multivariate_normal(mean, cov, size=b)


def test_exact_trace_matches_the_analytic_density():
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, helpers.correlated_denoise_fn(p), 'eps')
  x = _data(p, seed, 8)
  fn = jax.jit(functools.partial(ol.ode_log_likelihood, p, den, exact_trace=True,
                                 prior_logp=_exact_prior(p), rtol=1e-6, atol=1e-6))
  logp, prior, nfe = fn(jnp.asarray(x, jnp.float32), None)
  want = _log_normal(x, *oracles.correlated_marginal(p, p.t_min))
  rel = np.max(np.abs(np.asarray(logp) - want) / np.abs(want))
  print(f'exact trace: max relative error {rel:.2e} ({int(nfe)} evaluations); '
        f'log p {np.asarray(logp)[:3]} vs {want[:3]}')
  assert rel < 1e-3, seed
  # The direction: the prior term is evaluated at t = 1, where x is nearly N(0, I).
  assert np.all(np.asarray(prior) < 0)


@pytest.mark.slow
def test_hutchinson_is_unbiased_within_its_standard_error():
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, helpers.correlated_denoise_fn(p), 'eps')
  b = 64
  x = _data(p, seed, b)
  fn = jax.jit(functools.partial(ol.ode_log_likelihood, p, den, num_probes=2,
                                 prior_logp=_exact_prior(p), rtol=1e-5, atol=1e-5))
  logp, _, nfe = fn(jnp.asarray(x, jnp.float32), jax.random.key(seed))
  err = np.asarray(logp, np.float64) - _log_normal(x, *oracles.correlated_marginal(p, p.t_min))
  se = err.std(ddof=1) / math.sqrt(b)
  print(f'Hutchinson (2 probes): mean error {err.mean():.4f} ± {se:.4f} (per-example std '
        f'{err.std():.4f}), {int(nfe)} evaluations, seed {seed}')
  assert err.std() > 1e-3, 'the estimator should be noisy for a non-diagonal Jacobian'
  # 5 standard errors: the error is a heavy-tailed quadratic form of 2 Rademacher probes, and
  # at 3.5 one run in 600 failed by chance.
  assert abs(err.mean()) < 5 * se, seed


@pytest.mark.slow
def test_dequantized_bits_per_dim():
  """8-bit data: bits/dim = −log p(x + Δ(u − ½))/(D ln 2) + log₂ 127.5 with the dequantized
  point recomputed here, and its mean close to the discrete data's bits/dim
  −log₂(p(x)Δ^D)/D (bins are small against the data's scale)."""
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, helpers.correlated_denoise_fn(p), 'eps')
  b = 16
  k = np.clip(np.round((_data(p, seed, b) + 1) * 127.5), 0, 255)
  x = k / 127.5 - 1.0
  rng = jax.random.key(seed)
  fn = jax.jit(functools.partial(ol.ode_bits_per_dim, p, den, exact_trace=True,
                                 prior_logp=_exact_prior(p), rtol=1e-6, atol=1e-6))
  bpd, nfe = fn(jnp.asarray(x, jnp.float32), rng)
  bpd = np.asarray(bpd, np.float64)
  y = np.asarray(ol.dequantize(jnp.asarray(x, jnp.float32), jax.random.split(rng)[0]), np.float64)
  assert np.all(np.abs(y - x) <= 1 / 255 + 1e-6) and np.any(y != x)
  offset = math.log2(127.5)
  want = -_log_normal(y, *oracles.correlated_marginal(p, p.t_min)) / (D * math.log(2)) + offset
  print(f'dequantized bits/dim {bpd.mean():.4f} ({int(nfe)} evaluations); analytic '
        f'{want.mean():.4f}')
  np.testing.assert_allclose(bpd, want, rtol=1e-3, err_msg=f'seed {seed}')
  discrete = -_log_normal(x, *oracles.correlated_marginal(p, p.t_min)) / (D * math.log(2)) + offset
  assert abs(bpd.mean() - discrete.mean()) < 0.01, (bpd.mean(), discrete.mean(), seed)
  assert 0 < bpd.mean() < 12
