"""Log-likelihood and bits/dim through the probability-flow ODE (Song et al. 2021, app. D).

The PF-ODE is integrated from the data at t = 1/T to t = 1 in s = −λ (increasing), where it
reads dx/ds = F(x, s) = −(α x̂₀ + (d log σ/dλ) x) at λ = −s (for VP, −α(x̂₀ − αx); the
field of `solvers.pf_ode_lambda_field`, for any `continuous.Process`). Along a solution
d log p_s(x(s))/ds = −∇·F, so

  log p_{1/T}(x) = log p_1(x(s_1)) + ∫_{s_0}^{s_1} ∇·F(x(s), s) ds,

with the prior log p_1 = the process's `prior_logp` (N(0, I); N(0, σ_max² I) for VE) by default (any `prior_logp` may be passed, e.g.
the exact marginal at t = 1). ∇·F is the exact trace (one JVP per dimension) or Hutchinson–
Skilling's estimate vᵀ(∂F/∂x)v with Rademacher probes v, fixed along the path and averaged.

Bits/dim of 8-bit data. The library maps a byte k to x = k/127.5 − 1, so the grid has spacing
Δ = 2/255 and each x owns the bin [x − Δ/2, x + Δ/2] (the same bins as the discretised decoder
of the VLB). Uniform dequantization: w = k + u, u ~ U[0, 1)^D, is a density on [0, 256)^D and
y = Δ(w − ½) − 1 = x + Δ(u − ½) places it on the model's scale. Then p_W(w) = p_Y(y) Δ^D, and
by Jensen −log₂ P(k) ≤ E_u[−log₂ p_W(k + u)], so per dimension

  bits/dim ≤ −E_u[log p_Y(x + Δ(u − ½))]/(D ln 2) + log₂(1/Δ),  log₂(1/Δ) = log₂ 127.5 ≈ 6.994.

The density is that of the model's marginal at t = 1/T (σ(1/T) ≈ 0.01 for the DDPM schedule):
the model is not defined below that time.

Pure and jit-safe; no IO.
"""

from __future__ import annotations

import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.process.continuous import Denoiser, Process
from diffusion_jax.process.gaussian_diffusion import Array
from diffusion_jax.sampling.solvers import _diffrax_solver, diffrax_nfe, pf_ode_lambda_field

BIN_WIDTH = 2.0 / 255.0  # the spacing of the 256-level grid x = k/127.5 − 1


def standard_normal_logp(x: Array) -> Array:
  """log N(x; 0, I) summed over all axes but the first: `[B, ...] -> [B]`."""
  axes = tuple(range(1, x.ndim))
  dim = math.prod(x.shape[1:])
  return -0.5 * jnp.sum(jnp.square(x), axis=axes) - 0.5 * dim * math.log(2.0 * math.pi)


def _sum_flat(v: Array) -> Array:
  return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def ode_log_likelihood(process: Process, denoiser: Denoiser, x: Array, rng: Array | None, *,
                       exact_trace: bool = False, num_probes: int = 1, rtol: float = 1e-5,
                       atol: float = 1e-5, method: str = 'tsit5', max_steps: int = 4096,
                       prior_logp: Callable[[Array], Array] | None = None):
  """log p_{1/T}(x) in nats through the PF-ODE, from t = 1/T to t = 1.

  Args:
    x: `[B, ...]` points (continuous; dequantize 8-bit data first, see `ode_bits_per_dim`).
    rng: the key of the Rademacher probes (unused with `exact_trace`).
    exact_trace: the exact divergence, one JVP per dimension (small inputs only).
    num_probes: Hutchinson probes per example, averaged at every evaluation.
  Returns:
    (log p `[B]`, prior term `[B]`, vector-field evaluations int32 []); each evaluation costs
    one model call plus one JVP per probe (or per dimension).
  """
  if not exact_trace and (rng is None or num_probes < 1):
    raise ValueError(f'Hutchinson trace needs an rng key and num_probes >= 1, got '
                     f'rng={rng!r}, num_probes={num_probes!r}')
  import diffrax  # pylint: disable=g-import-not-at-top
  b = x.shape[0]
  dim = math.prod(x.shape[1:])

  lambda_field = pf_ode_lambda_field(denoiser, process)

  def field(s, x):  # dx/ds = −dx/dλ at λ = −s
    return -lambda_field(-s, x)

  if exact_trace:
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])  # [D, 1, ...]

    def divergence(s, x):
      f = lambda y: field(s, y)
      fx, jvp_fn = jax.linearize(f, x)
      cols = jax.vmap(lambda e: jvp_fn(jnp.broadcast_to(e, x.shape)))(basis)  # [D, B, ...]
      diag = jnp.sum(cols * basis, axis=tuple(range(2, cols.ndim)))  # [D, B]
      return fx, jnp.sum(diag, axis=0)
  else:
    probes = jax.random.rademacher(rng, (num_probes,) + x.shape, dtype=x.dtype)

    def divergence(s, x):
      f = lambda y: field(s, y)
      fx, jvp_fn = jax.linearize(f, x)
      jv = jax.vmap(jvp_fn)(probes)  # [K, B, ...]
      est = jax.vmap(_sum_flat)(jv * probes)  # [K, B]
      return fx, jnp.mean(est, axis=0)

  def vector_field(s, state, args):
    y, _ = state
    fx, div = divergence(s, y)
    return fx, div

  s0 = -process.lambda_max()
  s1 = -process.lambda_min()
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), _diffrax_solver(method), t0=s0, t1=s1, dt0=None,
      y0=(x, jnp.zeros((b,), x.dtype)),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  x1, delta = sol.ys[0][-1], sol.ys[1][-1]
  prior = (process.prior_logp if prior_logp is None else prior_logp)(x1)
  chex.assert_shape([prior, delta], (b,))
  return prior + delta, prior, jnp.asarray(diffrax_nfe(sol.stats, method), jnp.int32)


def dequantize(x: Array, rng: Array) -> Array:
  """x on the grid k/127.5 − 1 plus uniform noise over its bin: x + Δ(u − ½)."""
  u = jax.random.uniform(rng, x.shape, x.dtype)
  return x + BIN_WIDTH * (u - 0.5)


def ode_bits_per_dim(process: Process, denoiser: Denoiser, x: Array, rng: Array, *,
                     dequantize_data: bool = True, **likelihood_options):
  """Bits/dim `[B]` of 8-bit data `x` `[B, ...]` (values k/127.5 − 1) through the PF-ODE.

  With `dequantize_data` (the default) this is the dequantized bound on the discrete data's
  bits/dim; without it, it is −log₂ p(x)/D + log₂(1/Δ) of the points themselves (not a bound:
  a density can exceed 1/Δ^D at the grid points). Returns (bits/dim `[B]`, evaluations []).
  """
  k_deq, k_probe = jax.random.split(rng)
  y = dequantize(x, k_deq) if dequantize_data else x
  logp, _, nfe = ode_log_likelihood(process, denoiser, y, k_probe, **likelihood_options)
  dim = math.prod(x.shape[1:])
  return -logp / (dim * math.log(2.0)) + math.log2(1.0 / BIN_WIDTH), nfe
