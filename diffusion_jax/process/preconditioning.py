"""Karras et al. 2022's Table 1 as code: every model here, read as a preconditioned denoiser

    D(x̃; σ̃) = c_skip(σ̃) x̃ + c_out(σ̃) F(c_in(σ̃) x̃; c_noise(σ̃))

in the σ-space of the paper, x̃ = x/α and σ̃ = σ/α = e^{−λ}, where F is the network's own
output. The process gives c_in (its `input_scale` times α) and c_noise (its
`model_timestep`); the output type gives c_skip and c_out:

    eps     1        −σ̃           (DDPM, iDDPM, NCSN: Table 1's VP, iDDPM and VE columns)
    xstart  0         1
    v       α²/r     −σ/r          r = α² + σ² (1 on VP, where σ_d = 1: 1/(1 + σ̃²), −σ̃/√(1 + σ̃²))
    score   1         σ̃σ
    edm     σ_d²/(σ² + σ_d²)   σσ_d/√(σ² + σ_d²)   (α = 1)
    flow    α        −σ            (the velocity ε − x₀ on the 'flow' process, α + σ = 1)

so D is exactly the x̂₀ of `continuous.make_denoiser`, which the tests check. Two columns
differ from the paper's by choices made here before: our VE network sees c_in = 1/√(1 + σ²)
(theirs 1) and c_noise = ln σ (theirs ln(σ/2)); our VP is the discrete DDPM read continuously,
so c_noise is the (fractional) timestep T·t − 1, and `round_sigma` gives iDDPM's rounding to
the model's own levels. Any trained workdir is therefore sampled with EDM's Heun and its
churn by `--sampler heun --step_schedule karras --churn S`, without retraining.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.process import continuous
from diffusion_jax.process.gaussian_diffusion import MeanType

Array = jnp.ndarray


def coefficients(process: continuous.Process, mean_type, sigma_tilde: Array
                 ) -> tuple[Array, Array, Array, Array]:
  """(c_skip, c_out, c_in, c_noise) at σ̃ (any shape) for a model of `process` whose output
  is of `mean_type` (eps, xstart, v, score, edm or flow)."""
  mt = MeanType.parse(mean_type)
  sigma_tilde = jnp.asarray(sigma_tilde, jnp.float32)
  t = process.t_of_lambda(-jnp.log(sigma_tilde))
  alpha, sigma = process.alpha(t), process.sigma(t)
  c_in = process.input_scale(t) * alpha
  c_noise = process.model_timestep(t)
  if mt is MeanType.EPS:
    c_skip, c_out = jnp.ones_like(sigma_tilde), -sigma_tilde
  elif mt is MeanType.XSTART:
    c_skip, c_out = jnp.zeros_like(sigma_tilde), jnp.ones_like(sigma_tilde)
  elif mt is MeanType.V:   # x̂₀ = (αx − σv)/(α² + σ²), the denominator 1 on VP
    r = 1.0 if process.kind is continuous.ProcessKind.VP else jnp.square(alpha) + jnp.square(sigma)
    c_skip, c_out = jnp.square(alpha) / r, -sigma / r
  elif mt is MeanType.SCORE:
    c_skip, c_out = jnp.ones_like(sigma_tilde), sigma_tilde * sigma
  elif mt is MeanType.EDM:
    c_skip, c_out = continuous.edm_skip_out(sigma, process.sigma_data)
  elif mt is MeanType.FLOW:   # x̂₀ = x − σu = α x̃ − σu
    c_skip, c_out = alpha, -sigma
  else:
    raise ValueError(f'mean_type {mt.value!r} has no place in Table 1: eps, xstart, v, score, '
                     'edm or flow')
  return c_skip, c_out, c_in, c_noise


def round_sigma(process: continuous.VPProcess, sigma_tilde: Array) -> Array:
  """iDDPM's `round_sigma`: σ̃ moved to the nearest of the discrete model's own levels
  (in log σ̃), where it was trained."""
  levels = np.exp(-np.asarray(process.lam(process.t_nodes), np.float64))   # [T], increasing
  log_s = np.log(np.asarray(sigma_tilde, np.float64))
  idx = np.argmin(np.abs(np.log(levels)[None, :] - log_s.reshape(-1, 1)), axis=1)
  return jnp.asarray(levels[idx].reshape(np.shape(sigma_tilde)), jnp.float32)
