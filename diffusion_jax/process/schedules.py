"""Variance (β) schedules for the forward diffusion process.

Every schedule is computed in float64 NumPy on the host: the coefficients of the process are
derived from it once (see `gaussian_diffusion.GaussianDiffusion.from_betas`), so precision here
costs nothing at run time.

Names follow the DDPM code (Ho et al. 2020): ``linear``, ``quad``, ``const``, ``jsd``,
``warmup10``, ``warmup50``; plus ``cosine`` (Nichol & Dhariwal 2021) and ``sigmoid``. Any
schedule can be rescaled to zero terminal SNR (Lin et al. 2024).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def _linear(t: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start, beta_end, t, dtype=np.float64)


def _quad(t: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64) ** 2


def _const(t: int, beta_start: float, beta_end: float) -> np.ndarray:
  del beta_start
  return np.full(t, beta_end, dtype=np.float64)


def _jsd(t: int, beta_start: float, beta_end: float) -> np.ndarray:
  # 1/T, 1/(T-1), ..., 1: Sohl-Dickstein et al. 2015.
  del beta_start, beta_end
  return 1.0 / np.linspace(t, 1, t, dtype=np.float64)


def _warmup(fraction: float) -> Callable[[int, float, float], np.ndarray]:
  def schedule(t: int, beta_start: float, beta_end: float) -> np.ndarray:
    betas = np.full(t, beta_end, dtype=np.float64)
    warmup = int(t * fraction)
    betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
    return betas
  return schedule


def _sigmoid(t: int, beta_start: float, beta_end: float) -> np.ndarray:
  x = np.linspace(-6.0, 6.0, t, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """ᾱ at continuous time u ∈ [0, 1], unnormalised: cos²((u + s)/(1 + s)·π/2)."""
  return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[np.ndarray], np.ndarray],
                        max_beta: float = 0.999) -> np.ndarray:
  """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for a continuous ᾱ(u), u ∈ [0, 1]."""
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  a = alpha_bar(u)
  return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    'linear': _linear,
    'quad': _quad,
    'const': _const,
    'jsd': _jsd,
    'warmup10': _warmup(0.1),
    'warmup50': _warmup(0.5),
    'sigmoid': _sigmoid,
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(sorted([*_SCHEDULES, 'cosine']))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales a schedule so that ᾱ_T = 0 (Lin et al. 2024, Algorithm 1).

  √ᾱ is shifted so that its last value is 0 and scaled so that its first value is unchanged;
  the last β becomes exactly 1.
  """
  betas = np.asarray(betas, dtype=np.float64)
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  alphas_bar = sqrt_ab**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1.0 - alphas


def get_beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                      beta_end: float = 0.02, cosine_s: float = 0.008, max_beta: float = 0.999,
                      zero_terminal_snr: bool = False) -> np.ndarray:
  """Returns the β schedule `name` as float64 NumPy `[num_timesteps]`.

  Args:
    name: one of `SCHEDULE_NAMES`.
    num_timesteps: T, the number of diffusion steps (> 0).
    beta_start, beta_end: endpoints for linear/quad/const/warmup*/sigmoid (the paper's
      1e-4 and 0.02 by default; not rescaled with T).
    cosine_s, max_beta: the offset s and the β clip of the cosine schedule.
    zero_terminal_snr: rescale the schedule so that ᾱ_T = 0 (`rescale_zero_terminal_snr`).
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps <= 0:
    raise ValueError(f'num_timesteps must be a positive integer, got {num_timesteps!r}')
  if name == 'cosine':
    betas = betas_for_alpha_bar(num_timesteps, lambda u: cosine_alpha_bar(u, cosine_s), max_beta)
  elif name in _SCHEDULES:
    betas = _SCHEDULES[name](int(num_timesteps), beta_start, beta_end)
  else:
    raise ValueError(f'unknown beta schedule {name!r}; allowed: {", ".join(SCHEDULE_NAMES)}')
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  assert betas.shape == (num_timesteps,), betas.shape
  return betas
