"""The discrete DDPM chains as they were before they became solvers (diffusion_jax at 8b2fe3d,
`samplers.py`), frozen here as golden references for `diffusion_jax.sampling.solvers`'
`ddpm` and `ddim`: ancestral sampling over a (respaced) `GaussianDiffusion` through
`p_mean_variance`, the respaced β's, and DDIM with its encoder. Do not "fix" this file: the
tests compare the new solvers against it.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.process.gaussian_diffusion import (
    Array, DenoiseFn, GaussianDiffusion, MeanType, VarType, _pred_xstart, p_mean_variance,
    predict_noise_from_start)


# ------------------------------------------------------------------------------------------
# Respacing (Nichol & Dhariwal 2021): sample with K < T steps of the same process.
# ------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` timesteps out of `range(num_timesteps)`, evenly spaced, both ends included.

  Returns a sorted int NumPy array `[num_steps]`; one step keeps only the last timestep.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps!r}')
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  stride = (num_timesteps - 1) / (num_steps - 1)
  steps = np.round(np.arange(num_steps) * stride).astype(np.int64)
  assert len(np.unique(steps)) == num_steps, steps
  return steps


def respace(d: GaussianDiffusion, use_timesteps: Sequence[int]) -> GaussianDiffusion:
  """The process restricted to `use_timesteps`, with the respaced β's.

  β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}} (ᾱ_{τ_{−1}} = 1) keeps ᾱ at every kept step, so the
  marginals q(x_τ | x₀) are unchanged. `timestep_map` holds the original timesteps τ_i that
  the model is fed. Runs on the host: `d` must hold concrete arrays (not inside `jit`).
  """
  steps = np.asarray(sorted(set(int(s) for s in use_timesteps)))
  if steps.size == 0 or steps[0] < 0 or steps[-1] >= d.num_timesteps:
    raise ValueError(f'use_timesteps must be a non-empty subset of range({d.num_timesteps}), '
                     f'got {list(use_timesteps)!r}')
  ab = np.cumprod(1.0 - np.asarray(d.betas, np.float64))[steps]
  betas = 1.0 - ab / np.append(1.0, ab[:-1])
  old_map = np.asarray(d.timestep_map)
  return GaussianDiffusion.from_betas(betas, timestep_map=old_map[steps])


# ------------------------------------------------------------------------------------------
# Ancestral sampling.
# ------------------------------------------------------------------------------------------


def _full_t(i: Array, batch: int) -> Array:
  return jnp.full((batch,), i, dtype=jnp.int32)


def p_sample(d: GaussianDiffusion, denoise_fn: DenoiseFn, x_t: Array, t: Array, rng: Array, *,
             mean_type: str | MeanType, var_type: str | VarType,
             clip_denoised: bool = True) -> tuple[Array, Array]:
  """One ancestral step x_t → x_{t−1} ~ p_θ(x_{t−1} | x_t); no noise at t = 0.

  Returns (x_{t−1}, pred_xstart), each like x_t.
  """
  mean_type, var_type = MeanType.parse(mean_type), VarType.parse(var_type)
  model_output = denoise_fn(x_t, jnp.take(d.timestep_map, t))
  out = p_mean_variance(d, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
  nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
  return x_prev, out['pred_xstart']


def _ancestral_scan(d, denoise_fn, shape, rng, mean_type, var_type, clip_denoised, save_slots):
  """Runs the reverse chain; `save_slots[i]` ≥ 0 stores the state at step i in that slot."""
  init_rng, loop_rng = jax.random.split(rng)
  x_init = jax.random.normal(init_rng, shape, jnp.float32)  # x_{T−1}: [B, H, W, C]
  num_saved = int(max(save_slots.max() + 1, 0)) if save_slots is not None else 0
  chain = jnp.zeros((num_saved,) + tuple(shape), jnp.float32)
  preds = jnp.zeros((num_saved,) + tuple(shape), jnp.float32)

  def step(carry, i):
    x, chain, preds = carry
    x_prev, pred_xstart = p_sample(d, denoise_fn, x, _full_t(i, shape[0]),
                                   jax.random.fold_in(loop_rng, i), mean_type=mean_type,
                                   var_type=var_type, clip_denoised=clip_denoised)
    if num_saved:
      slot = jnp.asarray(save_slots)[i]
      chain, preds = jax.lax.cond(
          slot >= 0,
          lambda c, p: (c.at[slot].set(x), p.at[slot].set(pred_xstart)),
          lambda c, p: (c, p), chain, preds)
    return (x_prev, chain, preds), None

  steps = jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  (x0, chain, preds), _ = jax.lax.scan(step, (x_init, chain, preds), steps)
  return x0, chain, preds


def p_sample_loop(d: GaussianDiffusion, denoise_fn: DenoiseFn, shape: Sequence[int], rng: Array,
                  *, mean_type: str | MeanType, var_type: str | VarType,
                  clip_denoised: bool = True) -> Array:
  """Ancestral sampling (paper Algorithm 2) from x_T ~ N(0, I): returns x₀ `[*shape]`.

  For respaced sampling pass `respace(d, space_timesteps(T, K))`.
  """
  x0, _, _ = _ancestral_scan(d, denoise_fn, tuple(shape), rng, MeanType.parse(mean_type),
                             VarType.parse(var_type), clip_denoised, None)
  return x0


def p_sample_loop_progressive(d: GaussianDiffusion, denoise_fn: DenoiseFn,
                              shape: Sequence[int], rng: Array, *, mean_type: str | MeanType,
                              var_type: str | VarType, save_timesteps: Sequence[int],
                              clip_denoised: bool = True) -> tuple[Array, Array, Array]:
  """Ancestral sampling that also keeps the chain at `save_timesteps`.

  Returns (x₀ `[*shape]`, chain `[K, *shape]`, pred_xstart `[K, *shape]`): chain[k] is x_t fed
  to the model at timestep t = save_timesteps[k] (indices of `d`), pred_xstart[k] the x₀ it
  predicted there. Same rng → the same x₀ as `p_sample_loop`.
  """
  saves = [int(s) for s in save_timesteps]
  if not saves or min(saves) < 0 or max(saves) >= d.num_timesteps:
    raise ValueError(f'save_timesteps must be a non-empty subset of range({d.num_timesteps}), '
                     f'got {saves!r}')
  slots = np.full(d.num_timesteps, -1, np.int32)
  slots[saves] = np.arange(len(saves))
  if len(set(saves)) != len(saves):
    raise ValueError(f'save_timesteps must not repeat, got {saves!r}')
  return _ancestral_scan(d, denoise_fn, tuple(shape), rng, MeanType.parse(mean_type),
                         VarType.parse(var_type), clip_denoised, slots)


# ------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021).
# ------------------------------------------------------------------------------------------


def _eps_and_xstart(d, model_output, x_t, t, mean_type, clip_denoised):
  """(ε̂, x̂₀) from a model output; with clipping, ε̂ is re-derived from the clipped x̂₀."""
  # DDIM ignores a learned variance: only the first C channels are used.
  mean_output = model_output[..., :x_t.shape[-1]]
  pred_xstart = _pred_xstart(d, mean_output, x_t, t, mean_type)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  if mean_type is MeanType.EPS and not clip_denoised:
    return mean_output, pred_xstart
  return predict_noise_from_start(d, x_t, t, pred_xstart), pred_xstart


def _ddim_alphas(d: GaussianDiffusion, num_steps: int):
  """Kept timesteps τ `[S]` and ᾱ at them, with ᾱ_prev (1 before τ₀)."""
  taus = space_timesteps(d.num_timesteps, num_steps)
  ab = jnp.take(d.alphas_cumprod, jnp.asarray(taus))
  ab_prev = jnp.concatenate([jnp.ones((1,), ab.dtype), ab[:-1]])
  return jnp.asarray(taus, jnp.int32), ab, ab_prev


def ddim_sample_loop(d: GaussianDiffusion, denoise_fn: DenoiseFn, shape: Sequence[int],
                     rng: Array, *, num_steps: int, eta: float = 0.0,
                     mean_type: str | MeanType, clip_denoised: bool = True,
                     x_init: Array | None = None) -> Array:
  """DDIM sampling over `space_timesteps(T, num_steps)`; η = 0 is deterministic.

  x_{τ_{i−1}} = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε̂ + σ z with
  σ = η √((1 − ᾱ_prev)/(1 − ᾱ_τ)) √(1 − ᾱ_τ/ᾱ_prev); the last step (ᾱ_prev = 1) returns x̂₀.
  `x_init` (x_T, e.g. from `ddim_reverse_sample_loop`) replaces the initial noise.
  """
  mean_type = MeanType.parse(mean_type)
  shape = tuple(shape)
  taus, ab, ab_prev = _ddim_alphas(d, num_steps)
  init_rng, loop_rng = jax.random.split(rng)
  if x_init is None:
    x_init = jax.random.normal(init_rng, shape, jnp.float32)
  chex.assert_shape(x_init, shape)

  def step(x, i):
    t = _full_t(taus[i], shape[0])
    model_output = denoise_fn(x, jnp.take(d.timestep_map, t))
    eps, pred_xstart = _eps_and_xstart(d, model_output, x, t, mean_type, clip_denoised)
    a, a_prev = ab[i], ab_prev[i]
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), x.shape, x.dtype)
    x_prev = (jnp.sqrt(a_prev) * pred_xstart
              + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps + sigma * noise)
    return x_prev, None

  x0, _ = jax.lax.scan(step, x_init, jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
  return x0


def ddim_reverse_sample_loop(d: GaussianDiffusion, denoise_fn: DenoiseFn, x_start: Array, *,
                             num_steps: int, mean_type: str | MeanType,
                             clip_denoised: bool = True) -> Array:
  """The deterministic DDIM encoder x₀ → x_T (the η = 0 ODE run forwards).

  Step i moves from ᾱ_prev to ᾱ_{τ_i} with ε̂ evaluated at the current state and timestep
  τ_{max(i−1, 0)}; decoding the result with `ddim_sample_loop(..., eta=0, x_init=x_T)` over
  the same steps returns ≈ x₀. Used to interpolate between images in latent space.
  """
  mean_type = MeanType.parse(mean_type)
  taus, ab, _ = _ddim_alphas(d, num_steps)
  batch = x_start.shape[0]

  def step(x, i):
    j = jnp.maximum(i - 1, 0)
    t = _full_t(taus[j], batch)
    model_output = denoise_fn(x, jnp.take(d.timestep_map, t))
    eps, pred_xstart = _eps_and_xstart(d, model_output, x, t, mean_type, clip_denoised)
    # At the first step the state is x₀ itself: ε̂ comes from the model at τ₀, x̂₀ is x₀.
    pred_xstart = jnp.where(i == 0, x, pred_xstart)
    a = ab[i]
    x_next = jnp.sqrt(a) * pred_xstart + jnp.sqrt(1.0 - a) * eps
    return x_next, None

  x_end, _ = jax.lax.scan(step, x_start, jnp.arange(num_steps, dtype=jnp.int32))
  return x_end
