"""The tests' shared oracles: the exact denoiser of Gaussian data (and of correlated Gaussian
data), the PF-ODE's exact map and the solvers' orders, fresh logged seeds, and the check of a
one-line error.

Nothing here imports `diffusion_jax` (tests/helpers.py holds what needs it). No test module
imports another: what they share lives here, in tests/helpers.py or in a tests/conftest.py
fixture (tests/test_imports.py checks both rules). The denoiser is written from the Gaussian
posterior.
For data x₀ ~ N(μ, s²) per coordinate and x_t = a·x₀ + σ·ε, with d = a²s² + σ²:
    E[x₀ | x_t] = (a s² x_t + σ² μ) / d,      E[ε | x_t] = σ (x_t − a μ) / d,
both finite at a = 0 (zero terminal SNR) and at σ = 0.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------
# Seeds.
# ------------------------------------------------------------------------------------------


def new_seed() -> int:
  """A fresh 32-bit seed, printed (pytest shows it with a failure) so the run can be replayed:
  `TEST_SEED=<seed> pytest <the failed test>` draws that seed instead."""
  replay = os.environ.get('TEST_SEED')
  seed = int(replay) if replay else int.from_bytes(os.urandom(4), 'little')
  print(f'seed {seed}')
  return seed


def new_rng() -> tuple[np.random.Generator, int]:
  """A NumPy generator of a fresh, printed seed, and the seed."""
  seed = new_seed()
  return np.random.default_rng(seed), seed


# ------------------------------------------------------------------------------------------
# The exact denoiser of Gaussian data.
# ------------------------------------------------------------------------------------------


def gaussian_posterior(a, sigma, x, mu, s):
  """(E[x₀ | x_t], E[ε | x_t]) for x₀ ~ N(mu, s²), x_t = a x₀ + sigma ε (broadcasting)."""
  d = a * a * s * s + sigma * sigma
  return (a * s * s * x + sigma * sigma * mu) / d, sigma * (x - a * mu) / d


def gaussian_denoise_fn(alpha_sigma: Callable, mu: float, s: float, mean_type: str = 'eps',
                        extra_channels: int = 0, extra_value: float = 1e3,
                        input_scale: Callable | None = None) -> Callable:
  """The exact model as `denoise_fn(x [B, ...], model_timestep [B])`.

  `alpha_sigma(n) -> (a [B], σ [B])` gives the process at model timestep n (see
  `table_alpha_sigma`, `process_alpha_sigma`). The output is ε, x₀, v = aε − σx₀, the score
  −(x − aμ)/(a²s² + σ²) or the flow's velocity ε − x₀ (x = (1 − t)x₀ + tε) as `mean_type` says, with `extra_channels` channels of `extra_value`
  appended (a learned variance output the sampler must ignore or use). With `input_scale(n) ->
  c [B]` the model is handed c·x (a VE process's c_in) and divides it out first."""
  if mean_type not in ('eps', 'xstart', 'v', 'score', 'flow'):
    raise KeyError(mean_type)

  def denoise_fn(x, n):
    shape = (-1,) + (1,) * (x.ndim - 1)
    if input_scale is not None:
      x = x / jnp.reshape(input_scale(n), shape).astype(x.dtype)
    a, sigma = alpha_sigma(n)
    a, sigma = jnp.reshape(a, shape).astype(x.dtype), jnp.reshape(sigma, shape).astype(x.dtype)
    x0, eps = gaussian_posterior(a, sigma, x, mu, s)
    if mean_type == 'score':
      out = -(x - a * mu) / (a * a * s * s + sigma * sigma)
    else:
      out = {'eps': eps, 'xstart': x0, 'v': a * eps - sigma * x0,
             'flow': eps - x0}[mean_type]
    if extra_channels:
      out = jnp.concatenate(
          [out, jnp.full(x.shape[:-1] + (extra_channels,), extra_value, x.dtype)], -1)
    return out
  return denoise_fn


def table_alpha_sigma(alphas_cumprod) -> Callable:
  """`alpha_sigma` of a discrete process: √ᾱ_n and √(1 − ᾱ_n), from float64 tables."""
  ab = np.asarray(alphas_cumprod, np.float64)
  a_tab = jnp.asarray(np.sqrt(ab), jnp.float32)
  sigma_tab = jnp.asarray(np.sqrt(1.0 - ab), jnp.float32)
  return lambda n: (a_tab[n], sigma_tab[n])


def process_alpha_sigma(process, time_of: Callable | None = None) -> Callable:
  """`alpha_sigma` of a continuous process (`alpha(t)`, `sigma(t)`), whose model timestep n is
  the time `time_of(n)`: by default t = (n + 1) / num_timesteps, a VP process's."""
  def alpha_sigma(n):
    t = (n + 1.0) / process.num_timesteps if time_of is None else time_of(n)
    return process.alpha(t), process.sigma(t)
  return alpha_sigma


def exact_map(process, x, t0, t1, mu: float, s: float):
  """The PF-ODE's exact map of x at time t0 to time t1 for x₀ ~ N(mu, s²) per coordinate:
  a₁μ + √(v₁/v₀)(x − a₀μ), v = a²s² + σ²."""
  a0, s0, a1, s1 = process.alpha(t0), process.sigma(t0), process.alpha(t1), process.sigma(t1)
  v0, v1 = a0 ** 2 * s ** 2 + s0 ** 2, a1 ** 2 * s ** 2 + s1 ** 2
  return a1 * mu + jnp.sqrt(v1 / v0) * (x - a0 * mu)


# (solver, options, step counts, expected order), for the order-of-convergence tests on the
# exact map (tests/test_solvers.py on VP, tests/test_score_based.py on VE). DPM-Solver++ runs
# without lowering the final steps' order (which would cap 3M at order 2 below 10 steps). The
# ranges start where the errors are asymptotic (below 20 steps 2M's and 3M's λ-steps are longer
# than 0.5) and are kept short because every step count is one compile.
ORDER_CASES = [
    ('euler', {}, (5, 10, 20), 1.0),
    ('heun', {}, (10, 20, 40), 2.0),
    ('dpmpp_2m', {'lower_order_final': False}, (20, 40, 80), 2.0),
    ('dpmpp_3m', {'lower_order_final': False}, (20, 40, 80), 3.0),
]


# ------------------------------------------------------------------------------------------
# Correlated Gaussian data x₀ ~ N(μ, Σ), D = 4: p_t = N(αμ, α²Σ + σ²I), and the exact
# denoiser μ + αΣ(α²Σ + σ²I)⁻¹(x_t − αμ). Σ is not diagonal, so a Hutchinson estimate of the
# divergence is genuinely noisy (for a diagonal Jacobian a Rademacher probe is exact).
# ------------------------------------------------------------------------------------------

CORRELATED_MU = np.array([0.3, -0.1, 0.2, 0.0])
CORRELATED_D = CORRELATED_MU.size


def correlated_covariance() -> tuple[np.ndarray, np.ndarray]:
  """(Q, ev): Σ = Q diag(ev) Qᵀ, Q a fixed random rotation."""
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(CORRELATED_D, CORRELATED_D)))
  return q, np.array([0.05, 0.1, 0.2, 0.3])


def correlated_marginal(process, t) -> tuple[np.ndarray, np.ndarray]:
  """The float64 mean and covariance of p_t at a scalar time t of `process`."""
  q, ev = correlated_covariance()
  a = float(process.alpha(t))
  s2 = float(process.sigma(t)) ** 2
  return a * CORRELATED_MU, a ** 2 * (q * ev) @ q.T + s2 * np.eye(CORRELATED_D)


def correlated_denoise_fn(alpha_sigma: Callable, input_scale: Callable | None = None) -> Callable:
  """The exact ε of N(CORRELATED_MU, Σ) data as `denoise_fn(x [B, D], model_timestep [B])`
  (`alpha_sigma` and `input_scale` as for `gaussian_denoise_fn`)."""
  q, ev = (jnp.asarray(a, jnp.float32) for a in correlated_covariance())
  mu = jnp.asarray(CORRELATED_MU, jnp.float32)

  def denoise_fn(x, n):
    if input_scale is not None:
      x = x / input_scale(n)[:, None]
    a, sigma = alpha_sigma(n)
    a, sigma = a[:, None], sigma[:, None]
    # HIGHEST: the oracle is exact math; a GPU's default precision would round to TF32.
    z = jnp.matmul(x - a * mu, q, precision=HIGHEST)  # eigen-coordinates
    x0 = mu + jnp.matmul(a * ev / (a ** 2 * ev + sigma ** 2) * z, q.T, precision=HIGHEST)
    return (x - a * x0) / sigma
  return denoise_fn


def gaussian_log_density(mean, cov) -> Callable:
  """log N(x; mean, cov) of rows x [B, D] in float32, from a float64 mean and covariance."""
  prec = jnp.asarray(np.linalg.inv(cov), jnp.float32)
  m = jnp.asarray(mean, jnp.float32)
  const = -0.5 * (np.linalg.slogdet(cov)[1] + len(mean) * math.log(2 * math.pi))
  return lambda x: -0.5 * jnp.einsum('bi,ij,bj->b', x - m, prec, x - m,
                                     precision=HIGHEST) + const


# ------------------------------------------------------------------------------------------
# One-line errors.
# ------------------------------------------------------------------------------------------


def assert_one_line_error(error: BaseException | str, *fragments: str) -> str:
  """The message is one line and contains every fragment; returns it. An exception's message
  has no newline at all; a string (a line of captured output) may end in one."""
  message = str(error)
  line = message if isinstance(error, BaseException) else message.strip()
  assert '\n' not in line, f'not one line: {message!r}'
  for f in fragments:
    assert f in message, (f, message)
  return message
