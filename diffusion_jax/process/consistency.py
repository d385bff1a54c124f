"""Consistency models (Song et al. 2023): the boundary-preserving parameterization of a
consistency function, as an adapter over any denoiser. Pure JAX, no IO.

A consistency function maps a point x̃ = x/α of the PF-ODE at level σ̃ (= σ/α = e^{−λ}) to the
ODE's end x̃(σ̃_min). It must satisfy f(x̃, σ̃_min) = x̃ exactly. With the paper's coefficients

    c_skip(σ̃) = σ_d² / ((σ̃ − σ̃_min)² + σ_d²)                       (1 at σ̃_min)

the function here is

    f(x̃, σ̃) = c_skip(σ̃)·x̃ + (1 − c_skip(σ̃))·D(x̃; σ̃),

D being the model's own denoiser read through its output type (ε, x₀, v, score or EDM's F:
`continuous.make_denoiser`). In Table 1's terms its c_skip is c_skip + (1 − c_skip)·c_skip^D and
its c_out is (1 − c_skip)·c_out^D, which is 0 at σ̃_min: the boundary holds for every network,
and a student initialised from a teacher's weights starts as the teacher's denoiser wherever
σ̃ ≫ σ_d. (For an EDM network the paper's c_out = σ_d(σ̃ − σ̃_min)/√(σ_d² + σ̃²) differs from
ours by the factor relating EDM's c_out to 1 − c_skip; both vanish at σ̃_min.)

The adapter returns a denoiser of the solvers' signature, `(x [B, ...], t [B]) -> (x̂₀, ε̂)`
with ε̂ = (x − α x̂₀)/σ, so every solver runs on a consistency model unchanged; its own sampler
is `solvers.consistency`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.process.continuous import Denoiser, Process, eps_from_x0

Array = jax.Array


def sigma_tilde(process: Process, t: Array) -> Array:
  """σ̃(t) = σ/α = e^{−λ(t)}."""
  return jnp.exp(-process.lam(t))


def sigma_tilde_min(process: Process) -> Array:
  """The lowest level σ̃(t_min), where a consistency function is the identity."""
  return sigma_tilde(process, jnp.asarray(process.t_min, jnp.float32))


def c_skip(sig: Array, sigma_min: Array | float, sigma_data: float) -> Array:
  """σ_d² / ((σ̃ − σ̃_min)² + σ_d²): exactly 1 at σ̃ = σ̃_min."""
  return sigma_data ** 2 / (jnp.square(sig - sigma_min) + sigma_data ** 2)


def consistency_denoiser(denoiser: Denoiser, process: Process, sigma_data: float = 0.5
                         ) -> Denoiser:
  """f(x, t) as a denoiser `(x, t [B]) -> (x̂₀, ε̂)`, from the model's own `denoiser`."""
  sigma_min = sigma_tilde_min(process)

  def f(x: Array, t: Array):
    b = lambda c: jnp.reshape(c, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    alpha, sigma = b(process.alpha(t)), b(process.sigma(t))
    skip = b(c_skip(sigma_tilde(process, t), sigma_min, sigma_data))
    x0_model = denoiser(x, t)[0]
    x0 = skip * (x / alpha) + (1.0 - skip) * x0_model
    return x0, eps_from_x0(x, x0, alpha, sigma)

  return f
