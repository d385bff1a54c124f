"""EDM's training objective (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): log-normal noise levels, the loss weighting λ(σ), and
the preconditioned denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise). Pure JAX, no IO.

    ln σ ~ N(P_mean, P_std²),   L = E λ(σ) ‖D(y + σn; σ) − y‖²,   λ = (σ² + σ_d²)/(σ σ_d)²,

with c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²) and
c_noise = ¼ ln σ. Since λ c_out² = 1 the loss is ‖F − (y − c_skip x)/c_out‖²: the network's
target has unit variance at every σ. Training draws σ itself (not t), so levels beyond the
sampler's [σ_min, σ_max] are trained too, as in the paper; `continuous.EDMProcess` samples
with the same c_* (its `input_scale`, `model_timestep`, and `edm_skip_out`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.process.continuous import edm_skip_out

Array = jax.Array


def sample_sigma(rng: Array, shape, p_mean: float = -1.2, p_std: float = 1.2) -> Array:
  """σ with ln σ ~ N(p_mean, p_std²): the paper's training distribution of noise levels."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))


def loss_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
  """λ(σ) = (σ² + σ_d²)/(σ σ_d)²."""
  return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def preconditioning(sigma: Array, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
  """(c_skip, c_out, c_in, c_noise) at σ (any shape)."""
  c_skip, c_out = edm_skip_out(sigma, sigma_data)
  c_in = jax.lax.rsqrt(jnp.square(sigma) + sigma_data ** 2)
  return c_skip, c_out, c_in, 0.25 * jnp.log(sigma)


def denoise(net: Callable[[Array, Array], Array], x: Array, sigma: Array,
            sigma_data: float = 0.5) -> Array:
  """D(x; σ) for a network `net(c_in x [B, ...], c_noise [B]) -> F`; σ `[B]`."""
  c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
  b = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))
  return b(c_skip) * x + b(c_out) * net(b(c_in) * x, c_noise)


def loss(net: Callable[[Array, Array], Array], y: Array, sigma: Array, noise: Array,
         sigma_data: float = 0.5) -> Array:
  """λ(σ)·mean over pixels of (D(y + σn; σ) − y)², per example `[B]` (DDPM's pixel average).

  y, noise `[B, ...]`; σ `[B]`."""
  x = y + sigma.reshape(sigma.shape + (1,) * (y.ndim - 1)) * noise
  d = denoise(net, x, sigma, sigma_data)
  return loss_weight(sigma, sigma_data) * jnp.mean(jnp.square(d - y),
                                                   axis=tuple(range(1, y.ndim)))
