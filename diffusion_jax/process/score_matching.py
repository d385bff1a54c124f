"""Score-matching losses: denoising (DSM) and sliced (SSM) score matching.

  * Denoising score matching (Vincent 2011, "A connection between score matching and
    denoising autoencoders"): for x̃ = α x₀ + σ z, z ~ N(0, I), the score of q(x̃ | x₀) is
    −z/σ, and E‖s(x̃) + z/σ‖² differs from the Fisher divergence E‖s(x̃) − ∇ log p_σ(x̃)‖²
    only by a constant, so its minimiser is the score of the perturbed marginal p_σ. NCSN
    (Song & Ermon 2019, "Generative modeling by estimating gradients of the data
    distribution") trains one network at many σ with the weighting λ(σ) = σ², which makes
    every level's loss O(1): λ·½‖s + z/σ‖² = ½‖σ s + z‖².
  * Sliced score matching (Song, Garg, Shi & Ermon 2019, "Sliced score matching: a scalable
    approach to density and score estimation"): Hyvärinen's objective
    E[tr(∇ₓ s(x)) + ½‖s(x)‖²] with the trace replaced by the unbiased vᵀ (∇ₓ s) v for random
    projections v with E[v vᵀ] = I; per example vᵀ ∇ₓ(vᵀ s) + ½ (vᵀ s)², or, in the
    variance-reduced form SSM-VR, vᵀ ∇ₓ(vᵀ s) + ½‖s‖² (the second term then in closed form).
    Here vᵀ(∇ₓ s)v is one forward-mode product: `jax.jvp` of s at x along v gives J v.

Pure functions, jit/vmap/grad-safe, randomness from explicit keys; no IO. Arrays are
`[B, ...]` with the batch first; every loss is returned per example, `[B]` (sum over the
non-batch axes; average over the batch where it is used). String options (`weighting`,
`projection`) are static: bind them with `functools.partial` before `jax.jit`.

`score_fn` must treat the examples of a batch independently (no batch statistics): SSM's
Jacobian-vector products are taken through the whole batch at once.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.options import Option

Array = jax.Array

# (x [B, ...], noise level [B]) -> score [B, ...]; the level is σ for `dsm_loss`, t for
# `dsm_loss_process`.
ScoreFn = Callable[[Array, Array], Array]
# x [B, ...] -> score [B, ...] (the noise level, if any, bound by the caller).
UnconditionalScoreFn = Callable[[Array], Array]


class DSMWeighting(Option):
  SIGMA2 = 'sigma2'  # λ(σ) = σ² (Song & Ermon 2019): every level's loss is O(1)
  NONE = 'none'      # λ = 1

  @classmethod
  def _what(cls):
    return 'dsm weighting'


class Projection(Option):
  RADEMACHER = 'rademacher'  # entries ±1 with probability ½: E[v vᵀ] = I
  GAUSSIAN = 'gaussian'      # v ~ N(0, I): E[v vᵀ] = I

  @classmethod
  def _what(cls):
    return 'ssm projection'


def _sum_flat(v: Array) -> Array:
  """`[B, ...] -> [B]`: the sum over every axis but the first."""
  return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def _bcast(c: Array, x: Array) -> Array:
  """A `[B]` coefficient shaped to broadcast against `x` `[B, ...]`."""
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _dsm(score: Array, noise: Array, sigma: Array, weighting: DSMWeighting) -> Array:
  """λ(σ) · ½‖s + z/σ‖² per example, from the score s `[B, ...]`, z `[B, ...]`, σ `[B]`."""
  sig = _bcast(sigma, noise).astype(score.dtype)                      # [B, 1, ...]
  if weighting is DSMWeighting.SIGMA2:
    # σ² · ½‖s + z/σ‖² = ½‖σ s + z‖²: no division, finite as σ → 0.
    return 0.5 * _sum_flat(jnp.square(sig * score + noise))
  return 0.5 * _sum_flat(jnp.square(score + noise / sig))


def dsm_loss(score_fn: ScoreFn, x0: Array, sigma: Array, noise: Array,
             weighting: str | DSMWeighting = 'sigma2') -> Array:
  """Denoising score matching at per-example noise levels (VE / NCSN perturbation).

  x̃ = x₀ + σ z; the target is the conditional score ∇ log q(x̃ | x₀) = −z/σ (Vincent 2011);
  per example λ(σ) · ½‖score_fn(x̃, σ) + z/σ‖² summed over the non-batch axes, with
  λ = σ² ('sigma2', Song & Ermon 2019) or 1 ('none').

  Args:
    score_fn: `(x [B, ...], sigma [B]) -> score [B, ...]`.
    x0: clean data `[B, ...]`.
    sigma: noise levels `[B]`, > 0.
    noise: z ~ N(0, I), like `x0`.
    weighting: 'sigma2' or 'none'.

  Returns:
    The per-example loss `[B]`.
  """
  w = DSMWeighting.parse(weighting)
  chex.assert_equal_shape([x0, noise])
  chex.assert_shape(sigma, (x0.shape[0],))
  x_noisy = x0 + _bcast(sigma, x0).astype(x0.dtype) * noise           # [B, ...]
  score = score_fn(x_noisy, sigma)                                      # [B, ...]
  chex.assert_equal_shape([score, x0])
  return _dsm(score, noise, sigma, w)


def dsm_loss_process(score_fn: ScoreFn, process, x0: Array, t: Array, noise: Array,
                     weighting: str | DSMWeighting = 'sigma2') -> Array:
  """Denoising score matching under a continuous process (`diffusion_jax.process.continuous`: VP,
  VE or sub-VP).

  x_t = α(t) x₀ + σ(t) z (`process.q_sample`); the target score is −z/σ(t) (Vincent 2011;
  Song et al. 2021 eq. 7); per example λ · ½‖score_fn(x_t, t) + z/σ(t)‖² with λ = σ(t)²
  ('sigma2') or 1 ('none').

  Args:
    score_fn: `(x [B, ...], t [B]) -> score [B, ...]`.
    process: has `alpha(t)`, `sigma(t)` and `q_sample(x0, t, noise)`.
    x0: clean data `[B, ...]`.
    t: times `[B]`.
    noise: z ~ N(0, I), like `x0`.
    weighting: 'sigma2' or 'none'.

  Returns:
    The per-example loss `[B]`.
  """
  w = DSMWeighting.parse(weighting)
  chex.assert_equal_shape([x0, noise])
  chex.assert_shape(t, (x0.shape[0],))
  x_t = process.q_sample(x0, t, noise).astype(x0.dtype)                 # [B, ...]
  score = score_fn(x_t, t)                                              # [B, ...]
  chex.assert_equal_shape([score, x0])
  return _dsm(score, noise, process.sigma(t), w)


def _projections(rng: Array, shape, dtype, projection: Projection) -> Array:
  if projection is Projection.RADEMACHER:
    return jax.random.rademacher(rng, shape, dtype)
  return jax.random.normal(rng, shape, dtype)


def ssm_loss(score_fn: UnconditionalScoreFn, x: Array, rng: Array, num_projections: int = 1,
             projection: str | Projection = 'rademacher',
             variance_reduced: bool = False) -> Array:
  """Sliced score matching (Song et al. 2019), per example, averaged over projections.

  For each projection v (E[v vᵀ] = I) the estimate of Hyvärinen's
  tr(∇ₓ s) + ½‖s‖² is vᵀ ∇ₓ(vᵀ s) + ½ (vᵀ s)², or vᵀ ∇ₓ(vᵀ s) + ½‖s‖² when
  `variance_reduced` (SSM-VR). vᵀ ∇ₓ(vᵀ s) = vᵀ (J v) takes one `jax.jvp` of `score_fn` at x
  along v per projection (forward mode; s(x) itself is evaluated once).

  Args:
    score_fn: `x [B, ...] -> score [B, ...]`, examples independent of each other.
    x: data `[B, ...]`.
    rng: a PRNG key for the projections.
    num_projections: M ≥ 1 projections per example (a static int).
    projection: 'rademacher' or 'gaussian'.
    variance_reduced: the SSM-VR form.

  Returns:
    The per-example loss `[B]`, the mean of the M per-projection estimates.
  """
  proj = Projection.parse(projection)
  if isinstance(num_projections, bool) or not isinstance(num_projections, int) \
      or num_projections < 1:
    raise ValueError(f'num_projections must be an int >= 1, got {num_projections!r}')
  vs = _projections(rng, (num_projections,) + x.shape, x.dtype, proj)  # [M, B, ...]

  def along(v):                                                         # v [B, ...]
    return jax.jvp(score_fn, (x,), (v,))                               # (s, J v)

  score, jv = jax.vmap(along, out_axes=(None, 0))(vs)                  # [B, ...], [M, B, ...]
  chex.assert_equal_shape([score, x])
  jac_term = jax.vmap(_sum_flat)(vs * jv)                               # [M, B] vᵀ J v
  if variance_reduced:
    norm_term = 0.5 * _sum_flat(jnp.square(score))[None]                # [1, B] ½‖s‖²
  else:
    norm_term = 0.5 * jnp.square(jax.vmap(_sum_flat)(vs * score[None]))  # [M, B] ½(vᵀs)²
  return jnp.mean(jac_term + norm_term, axis=0)                         # [B]
