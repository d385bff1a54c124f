"""Flow matching's objective on the linear interpolant (Lipman et al. 2023; Liu et al. 2023's
rectified flow; Esser et al. 2024's time densities). Pure JAX, no IO.

    x_t = (1 − t) x₀ + t ε,   u = dx_t/dt = ε − x₀,   L = E_t E ‖u_θ(x_t, t) − (ε − x₀)‖²

over t drawn from a density on (0, 1): 'uniform' (t ~ U(t_min, t_max)) or 'logit_normal'
(t = sigmoid(n), n ~ N(m, s²): SD3's choice, more weight mid-path), clipped to the process's
[t_min, t_max]. The network sees the process's `model_timestep(t)` (1000·t) as every model
does (`continuous.make_denoiser`), so training and sampling call it alike.

Reflow (Liu et al.'s "rectify"): the same loss on pairs (ε, x₀) that the teacher's PF-ODE
joined, x₀ = ODE(ε), instead of independent ones; `training/reflow.py` makes the pairs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.options import Option

Array = jax.Array


class TimeDensity(Option):
  """How training draws t on the flow's path."""
  UNIFORM = 'uniform'             # t ~ U(t_min, t_max)
  LOGIT_NORMAL = 'logit_normal'   # t = sigmoid(n), n ~ N(t_mean, t_std²) (Esser et al. 2024)

  @classmethod
  def _what(cls):
    return 'diffusion.t_density'


def sample_time(rng: Array, shape, density, t_min: float, t_max: float, mean: float = 0.0,
                std: float = 1.0) -> Array:
  """float32 times `shape` from `density`, within [t_min, t_max]."""
  density = TimeDensity.parse(density)
  if density is TimeDensity.UNIFORM:
    return jax.random.uniform(rng, shape, jnp.float32, t_min, t_max)
  n = mean + std * jax.random.normal(rng, shape, jnp.float32)
  return jnp.clip(jax.nn.sigmoid(n), t_min, t_max)


def log_density(t: Array, density, t_min: float, t_max: float, mean: float = 0.0,
                std: float = 1.0) -> Array:
  """log p(t) of `density` on (t_min, t_max), before the clipping of `sample_time` (whose
  atoms at the ends carry the logit-normal's tails): uniform 1/(t_max − t_min); logit-normal
  N(logit t; m, s²)/(t(1 − t))."""
  density = TimeDensity.parse(density)
  t = jnp.asarray(t)
  if density is TimeDensity.UNIFORM:
    return jnp.full_like(t, -np.log(t_max - t_min))
  logit = jnp.log(t) - jnp.log1p(-t)
  return (-0.5 * jnp.square((logit - mean) / std) - np.log(std) - 0.5 * np.log(2 * np.pi)
          - jnp.log(t) - jnp.log1p(-t))


def interpolate(x0: Array, noise: Array, t: Array) -> Array:
  """x_t = (1 − t) x₀ + t ε; t `[B]`."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: Array, noise: Array) -> Array:
  """u = dx_t/dt = ε − x₀."""
  return noise - x0


def loss(velocity_fn: Callable[[Array, Array], Array], x0: Array, t: Array, noise: Array
         ) -> Array:
  """The flow-matching loss per example `[B]`, the mean over pixels of (u_θ − (ε − x₀))²
  (DDPM's pixel average): `velocity_fn(x_t [B, ...], t [B]) -> u_θ` (the network at the
  process's model timestep, `continuous.make_denoiser`'s convention). x0, noise `[B, ...]`."""
  u = velocity_fn(interpolate(x0, noise, t), t)
  return jnp.mean(jnp.square(u - velocity_target(x0, noise)), axis=tuple(range(1, x0.ndim)))
