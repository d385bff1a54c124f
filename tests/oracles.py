"""The tests' shared oracles: the exact denoiser of Gaussian data, fresh logged seeds, and the
check of a one-line error.

Nothing here imports `diffusion_jax`; the denoiser is written from the Gaussian posterior.
For data x₀ ~ N(μ, s²) per coordinate and x_t = a·x₀ + σ·ε, with d = a²s² + σ²:
    E[x₀ | x_t] = (a s² x_t + σ² μ) / d,      E[ε | x_t] = σ (x_t − a μ) / d,
both finite at a = 0 (zero terminal SNR) and at σ = 0.
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import numpy as np


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
                        extra_channels: int = 0, extra_value: float = 1e3) -> Callable:
  """The exact model as `denoise_fn(x [B, ...], model_timestep [B])`.

  `alpha_sigma(n) -> (a [B], σ [B])` gives the process at model timestep n (see
  `table_alpha_sigma`, `process_alpha_sigma`). The output is ε, x₀ or v = aε − σx₀ as
  `mean_type` says, with `extra_channels` channels of `extra_value` appended (a learned
  variance output the sampler must ignore or use)."""
  if mean_type not in ('eps', 'xstart', 'v'):
    raise KeyError(mean_type)

  def denoise_fn(x, n):
    a, sigma = alpha_sigma(n)
    shape = (-1,) + (1,) * (x.ndim - 1)
    a, sigma = jnp.reshape(a, shape).astype(x.dtype), jnp.reshape(sigma, shape).astype(x.dtype)
    x0, eps = gaussian_posterior(a, sigma, x, mu, s)
    out = {'eps': eps, 'xstart': x0, 'v': a * eps - sigma * x0}[mean_type]
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


def process_alpha_sigma(process) -> Callable:
  """`alpha_sigma` of a continuous process (`alpha(t)`, `sigma(t)`, `num_timesteps`), whose
  model timestep n is the time t = (n + 1) / num_timesteps."""
  def alpha_sigma(n):
    t = (n + 1.0) / process.num_timesteps
    return process.alpha(t), process.sigma(t)
  return alpha_sigma


# ------------------------------------------------------------------------------------------
# One-line errors.
# ------------------------------------------------------------------------------------------


def assert_one_line_error(error: BaseException | str, *fragments: str) -> str:
  """The message is one line and contains every fragment; returns it."""
  message = str(error)
  assert '\n' not in message.strip(), f'not one line: {message!r}'
  for f in fragments:
    assert f in message, (f, message)
  return message
