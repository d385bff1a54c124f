"""The Gaussian diffusion process of DDPM (Ho et al. 2020) as pure JAX functions.

Conventions
  * Images are NHWC floats in [-1, 1] (any rank ≥ 1 works: axis 0 is the batch).
  * `t` is int32 `[B]`, 0-indexed: t = 0 is the first noising step (the paper's t = 1).
  * `denoise_fn(x_t, t) -> model_output`; for a respaced process the model is called with the
    original timestep `d.timestep_map[t]`.
  * String options (`mean_type`, `var_type`, `loss_type`) are resolved once, on entry, into
    the enums below; everything underneath works on the enums.

All functions are pure and jit/vmap/grad-safe; the string options are static (bind them with
`functools.partial` before `jax.jit`). This module does no IO.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.options import Option

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


# ------------------------------------------------------------------------------------------
# String options, resolved once.
# ------------------------------------------------------------------------------------------


class MeanType(Option):
  """What the model's (first C) output channels predict."""
  EPS = 'eps'        # the noise ε
  XSTART = 'xstart'  # x₀
  V = 'v'            # v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022)
  XPREV = 'xprev'    # the posterior mean μ̃(x_t, x₀) itself
  SCORE = 'score'    # ∇ log p_t(x_t) = −ε/σ (score-based models; continuous-time only)
  EDM = 'edm'        # F of Karras et al. 2022: x̂₀ = c_skip x + c_out F (the 'edm' process)
  FLOW = 'flow'      # the velocity u = ε − x₀ of x_t = (1 − t) x₀ + t ε (the 'flow' process)

  @classmethod
  def _what(cls):
    return 'mean_type'


class VarType(Option):
  """How the reverse-process variance Σ_θ(x_t, t) is chosen."""
  FIXED_SMALL = 'fixedsmall'        # β̃_t, the posterior variance
  FIXED_LARGE = 'fixedlarge'        # β_t (β̃₁ at t = 0)
  LEARNED = 'learned'               # the model outputs log Σ directly (last C channels)
  LEARNED_RANGE = 'learned_range'   # log Σ = frac·log β + (1−frac)·log β̃, frac = (v+1)/2

  @property
  def is_learned(self) -> bool:
    return self in (VarType.LEARNED, VarType.LEARNED_RANGE)

  @classmethod
  def _what(cls):
    return 'var_type'


class LossType(Option):
  MSE = 'mse'        # L_simple (plus the VLB term for learned variances, as in improved DDPM)
  KL = 'kl'          # L_vlb: the variational bound term L_t
  HYBRID = 'hybrid'  # L_simple + λ·L_vlb with the mean stopped, λ = 0.001

  @classmethod
  def _what(cls):
    return 'loss_type'


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """What a model's output means: its mean type and variance type, parsed once.

  Hashable, so it can be a static argument or part of a frozen spec; strings are accepted
  (`Parameterization('v', 'learned_range')`) and parsed on construction. The functions below
  take its two fields: `p_mean_variance(d, out, x_t, t, **param.as_kwargs())`.
  """
  mean_type: MeanType = MeanType.EPS
  var_type: VarType = VarType.FIXED_LARGE

  def __post_init__(self):
    object.__setattr__(self, 'mean_type', MeanType.parse(self.mean_type))
    object.__setattr__(self, 'var_type', VarType.parse(self.var_type))

  def out_channels(self, channels: int) -> int:
    """The model's output channels for `channels` image channels (twice for learned Σ)."""
    return channels * (2 if self.var_type.is_learned else 1)

  def as_kwargs(self) -> dict[str, Any]:
    return dict(mean_type=self.mean_type, var_type=self.var_type)


# ------------------------------------------------------------------------------------------
# The process.
# ------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GaussianDiffusion:
  """Coefficients of a diffusion process with T steps, each a float32 `[T]` array.

  Build with `GaussianDiffusion.from_betas(betas)`: the coefficients are computed in float64
  and stored as float32. A pytree, so it can be passed to jitted functions as an argument.
  """
  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  alphas_cumprod_next: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  log_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  # The model's timestep for each index: arange(T), or the kept steps of a respaced process.
  timestep_map: Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas, timestep_map=None) -> 'GaussianDiffusion':
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}')
    if not (np.all(betas > 0) and np.all(betas <= 1)):
      raise ValueError(f'betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}')
    t = betas.shape[0]
    if timestep_map is None:
      timestep_map = np.arange(t)
    timestep_map = np.asarray(timestep_map)
    if timestep_map.shape != (t,):
      raise ValueError(f'timestep_map must have shape ({t},), got {timestep_map.shape}')

    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    ab_next = np.append(ab[1:], 0.0)
    with np.errstate(divide='ignore'):  # ᾱ_T = 0 under a zero-terminal-SNR schedule.
      posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
      # β̃₀ = 0: clip the log at t = 0 to that of t = 1, as in the paper's code.
      log_post = np.log(np.append(posterior_variance[1], posterior_variance[1:])
                        if t > 1 else np.maximum(posterior_variance, 1e-20))
      fields = dict(
          betas=betas,
          alphas_cumprod=ab,
          alphas_cumprod_prev=ab_prev,
          alphas_cumprod_next=ab_next,
          sqrt_alphas_cumprod=np.sqrt(ab),
          sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
          log_one_minus_alphas_cumprod=np.log(1.0 - ab),
          sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
          sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ab - 1.0),
          posterior_variance=posterior_variance,
          posterior_log_variance_clipped=log_post,
          posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
          posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
      )
    arrays = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in fields.items()}
    return cls(**arrays, timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32))


def _extract(coef: Array, t: Array, ndim: int) -> Array:
  """coef[t] shaped `[B, 1, ..., 1]` to broadcast against a rank-`ndim` batch."""
  chex.assert_rank(t, 1)
  return jnp.take(coef, t).reshape(t.shape + (1,) * (ndim - 1))


def _model_timesteps(d: GaussianDiffusion, t: Array) -> Array:
  return jnp.take(d.timestep_map, t)


# ------------------------------------------------------------------------------------------
# q: the forward process and its posterior.
# ------------------------------------------------------------------------------------------


def q_mean_variance(d: GaussianDiffusion, x_start: Array, t: Array):
  """q(x_t | x₀) = N(√ᾱ_t x₀, (1−ᾱ_t) I) → (mean, variance, log_variance), each like x₀."""
  mean = _extract(d.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
  # (√(1−ᾱ))² keeps float32 precision at small t, where 1 − ᾱ in float32 would lose it.
  variance = jnp.broadcast_to(
      _extract(jnp.square(d.sqrt_one_minus_alphas_cumprod), t, x_start.ndim), x_start.shape)
  log_variance = jnp.broadcast_to(_extract(d.log_one_minus_alphas_cumprod, t, x_start.ndim),
                                  x_start.shape)
  return mean, variance, log_variance


def q_sample(d: GaussianDiffusion, x_start: Array, t: Array, noise: Array) -> Array:
  """Samples x_t ~ q(x_t | x₀) as √ᾱ_t x₀ + √(1−ᾱ_t) ε (paper eq. 4)."""
  chex.assert_equal_shape([x_start, noise])
  return (_extract(d.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
          + _extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)


def q_posterior_mean_variance(d: GaussianDiffusion, x_start: Array, x_t: Array, t: Array):
  """q(x_{t-1} | x_t, x₀) = N(μ̃_t, β̃_t I) (paper eqs. 6–7).

  Returns (mean, variance, log_variance_clipped), each like x_t.
  """
  chex.assert_equal_shape([x_start, x_t])
  n = x_t.ndim
  mean = (_extract(d.posterior_mean_coef1, t, n) * x_start
          + _extract(d.posterior_mean_coef2, t, n) * x_t)
  variance = jnp.broadcast_to(_extract(d.posterior_variance, t, n), x_t.shape)
  log_variance = jnp.broadcast_to(_extract(d.posterior_log_variance_clipped, t, n), x_t.shape)
  return mean, variance, log_variance


def predict_start_from_noise(d: GaussianDiffusion, x_t: Array, t: Array, noise: Array) -> Array:
  """x₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
  n = x_t.ndim
  return (_extract(d.sqrt_recip_alphas_cumprod, t, n) * x_t
          - _extract(d.sqrt_recipm1_alphas_cumprod, t, n) * noise)


def predict_noise_from_start(d: GaussianDiffusion, x_t: Array, t: Array, x_start: Array) -> Array:
  """ε = (x_t − √ᾱ_t x₀) / √(1−ᾱ_t): the inverse of `predict_start_from_noise`.

  Finite also where ᾱ_t = 0 (zero terminal SNR), where it is x_t itself.
  """
  n = x_t.ndim
  return ((x_t - _extract(d.sqrt_alphas_cumprod, t, n) * x_start)
          / _extract(d.sqrt_one_minus_alphas_cumprod, t, n))


def predict_start_from_v(d: GaussianDiffusion, x_t: Array, t: Array, v: Array) -> Array:
  """x₀ = √ᾱ_t x_t − √(1−ᾱ_t) v, for v = √ᾱ_t ε − √(1−ᾱ_t) x₀."""
  n = x_t.ndim
  return (_extract(d.sqrt_alphas_cumprod, t, n) * x_t
          - _extract(d.sqrt_one_minus_alphas_cumprod, t, n) * v)


def get_v(d: GaussianDiffusion, x_start: Array, t: Array, noise: Array) -> Array:
  """The v-prediction target √ᾱ_t ε − √(1−ᾱ_t) x₀."""
  n = x_start.ndim
  return (_extract(d.sqrt_alphas_cumprod, t, n) * noise
          - _extract(d.sqrt_one_minus_alphas_cumprod, t, n) * x_start)


def predict_start_from_prev(d: GaussianDiffusion, x_t: Array, t: Array, x_prev: Array) -> Array:
  """x₀ from the posterior mean: (μ̃ − coef2·x_t) / coef1."""
  n = x_t.ndim
  return ((x_prev - _extract(d.posterior_mean_coef2, t, n) * x_t)
          / _extract(d.posterior_mean_coef1, t, n))


# ------------------------------------------------------------------------------------------
# p: the model's reverse process.
# ------------------------------------------------------------------------------------------


def split_model_output(model_output: Array, x_t: Array, var_type: VarType):
  """Splits `[..., 2C]` into mean and variance outputs for learned variances."""
  c = x_t.shape[-1]
  if var_type.is_learned:
    chex.assert_shape(model_output, x_t.shape[:-1] + (2 * c,))
    return model_output[..., :c], model_output[..., c:]
  chex.assert_shape(model_output, x_t.shape)
  return model_output, None


def _model_variance(d: GaussianDiffusion, var_output, x_t: Array, t: Array, var_type: VarType):
  n = x_t.ndim
  if var_type is VarType.LEARNED:
    log_variance = var_output
  elif var_type is VarType.LEARNED_RANGE:
    min_log = _extract(d.posterior_log_variance_clipped, t, n)
    max_log = _extract(jnp.log(d.betas), t, n)
    frac = (var_output + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
  elif var_type is VarType.FIXED_SMALL:
    log_variance = jnp.broadcast_to(_extract(d.posterior_log_variance_clipped, t, n), x_t.shape)
  else:  # FIXED_LARGE: β_t, with β̃₁ at t = 0 so that the decoder keeps a sensible scale.
    large = jnp.concatenate([d.posterior_variance[1:2], d.betas[1:]])
    log_variance = jnp.broadcast_to(_extract(jnp.log(large), t, n), x_t.shape)
  return jnp.exp(log_variance), log_variance


def _refuse_score(mean_type: MeanType) -> None:
  if mean_type in (MeanType.SCORE, MeanType.EDM, MeanType.FLOW):
    raise ValueError(f'mean_type {mean_type.value!r} is for the continuous-time solvers and '
                     'objectives, not the discrete DDPM chains or losses')


def _pred_xstart(d, mean_output, x_t, t, mean_type: MeanType) -> Array:
  _refuse_score(mean_type)
  if mean_type is MeanType.EPS:
    return predict_start_from_noise(d, x_t, t, mean_output)
  if mean_type is MeanType.XSTART:
    return mean_output
  if mean_type is MeanType.V:
    return predict_start_from_v(d, x_t, t, mean_output)
  return predict_start_from_prev(d, x_t, t, mean_output)


def p_mean_variance(d: GaussianDiffusion, model_output: Array, x_t: Array, t: Array, *,
                    mean_type: str | MeanType, var_type: str | VarType,
                    clip_denoised: bool = True) -> dict[str, Array]:
  """p_θ(x_{t-1} | x_t) from a model output.

  Args:
    model_output: `[B, ..., C]`, or `[B, ..., 2C]` for learned variances (the last C channels
      are the variance output).
    x_t: `[B, ..., C]`; t: int32 `[B]`.
  Returns:
    dict with `mean`, `variance`, `log_variance` and `pred_xstart`, each like x_t.
  """
  mean_type, var_type = MeanType.parse(mean_type), VarType.parse(var_type)
  mean_output, var_output = split_model_output(model_output, x_t, var_type)
  variance, log_variance = _model_variance(d, var_output, x_t, t, var_type)
  pred_xstart = _pred_xstart(d, mean_output, x_t, t, mean_type)
  if mean_type is MeanType.XPREV:
    mean = mean_output  # the model predicts μ̃ itself; clipping x₀ does not change it.
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  else:
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)




# ------------------------------------------------------------------------------------------
# Likelihood pieces.
# ------------------------------------------------------------------------------------------


def mean_flat(x: Array) -> Array:
  """Mean over all axes but the first: `[B, ...] -> [B]`."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats.

  ½(e^δ − 1 − δ + (μ₁ − μ₂)² e^{−logvar2}) with δ = logvar1 − logvar2: the variance part as
  expm1(δ) − δ is exactly 0 for equal variances and loses only ~|δ| ulps otherwise, where the
  textbook −1 + logvar2 − logvar1 + e^δ loses ~|logvar| ulps (≈10⁻⁶ absolute at log β̃ ≈ −9).
  """
  delta = logvar1 - logvar2
  return 0.5 * (jnp.expm1(delta) - delta + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_ndtr_diff(a: Array, b: Array) -> Array:
  """log(Φ(b) − Φ(a)) for finite a < b, accurate in both tails."""
  # Φ(b) − Φ(a) = Φ(−a) − Φ(−b): reflect so the interval lies mostly left of 0, where
  # log Φ keeps its precision.
  flip = (a + b) > 0
  a, b = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
  log_b = jax.scipy.special.log_ndtr(b)
  log_a = jax.scipy.special.log_ndtr(a)
  return log_b + jnp.log1p(-jnp.exp(jnp.minimum(log_a - log_b, 0.0)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
  """log p(x) for x on the 256-level grid of [-1, 1] under a discretised Gaussian.

  Each value owns the bin [x − 1/255, x + 1/255]; the lowest bin (x < −0.999) extends to −∞
  and the highest (x > 0.999) to +∞. Elementwise, in nats; `log_scales` is log σ. Uses the
  exact normal CDF (the DDPM code used a tanh approximation of it).
  """
  chex.assert_equal_shape([x, means, log_scales])
  inv_stdv = jnp.exp(-log_scales)
  centered = x - means
  lower = (centered - 1.0 / 255.0) * inv_stdv
  upper = (centered + 1.0 / 255.0) * inv_stdv
  log_bottom = jax.scipy.special.log_ndtr(upper)   # log Φ(upper)
  log_top = jax.scipy.special.log_ndtr(-lower)     # log(1 − Φ(lower))
  log_mid = _log_ndtr_diff(lower, upper)
  log_probs = jnp.where(x < -0.999, log_bottom, jnp.where(x > 0.999, log_top, log_mid))
  return jnp.maximum(log_probs, -1e4)  # an impossible bin: finite value and gradient


# ------------------------------------------------------------------------------------------
# Losses.
# ------------------------------------------------------------------------------------------


def _vb_terms_bpd(d, model_output, x_start, x_t, t, mean_type, var_type, clip_denoised):
  """L_t in bits/dim: KL(q(x_{t-1}|x_t,x₀) ‖ p_θ(x_{t-1}|x_t)) for t > 0, the decoder NLL at t = 0.

  Returns (vb [B], model dict of p_mean_variance).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
  out = p_mean_variance(d, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']))
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x_start, means=out['mean'], log_scales=0.5 * out['log_variance']))
  vb = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
  return vb, out


def _mse_target(d, x_start, x_t, t, noise, mean_type: MeanType) -> Array:
  _refuse_score(mean_type)
  if mean_type is MeanType.EPS:
    return noise
  if mean_type is MeanType.XSTART:
    return x_start
  if mean_type is MeanType.V:
    return get_v(d, x_start, t, noise)
  return q_posterior_mean_variance(d, x_start, x_t, t)[0]


def snr(d: GaussianDiffusion, t: Array) -> Array:
  """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at integer timesteps `[B]`.

  1 − ᾱ_t is taken from the float64-derived √(1−ᾱ_t): formed in float32 from ᾱ_t ≈ 1 it would
  lose ~1/(1−ᾱ_t) ulps (5·10⁻⁴ relative at t = 0 of the cosine schedule).
  """
  ab = jnp.take(d.alphas_cumprod, t)
  return ab / jnp.square(jnp.take(d.sqrt_one_minus_alphas_cumprod, t))


def min_snr_weight(d: GaussianDiffusion, t: Array, gamma: float,
                   mean_type: str | MeanType) -> Array:
  """Min-SNR-γ loss weights `[B]` (Hang et al. 2023), expressed for each prediction target.

  The weight is min(SNR, γ) on the x₀-MSE; for ε and v targets it is divided by the factor
  that converts their MSE into the x₀-MSE (SNR and SNR + 1).
  """
  mean_type = MeanType.parse(mean_type)
  s = snr(d, t)
  clipped = jnp.minimum(s, gamma)
  if mean_type is MeanType.EPS:
    return clipped / s
  if mean_type is MeanType.V:
    return clipped / (s + 1.0)
  if mean_type is MeanType.XSTART:
    return clipped
  raise ValueError(f'min-SNR weighting is defined for eps, v and xstart, not {mean_type.value!r}')


def training_loss_terms(d: GaussianDiffusion, denoise_fn: DenoiseFn, x_start: Array, t: Array,
                        noise: Array, *, loss_type: str | LossType, mean_type: str | MeanType,
                        var_type: str | VarType, snr_gamma: float | None = None,
                        vlb_weight: float = 1e-3) -> dict[str, Array]:
  """Like `training_losses`, but returns the terms: `loss`, `mse` and `vb`, each `[B]`.

  `vb` is the bound term L_t in bits/dim (zero where the loss does not use it).
  """
  loss_type = LossType.parse(loss_type)
  mean_type = MeanType.parse(mean_type)
  var_type = VarType.parse(var_type)
  chex.assert_equal_shape([x_start, noise])
  chex.assert_shape(t, (x_start.shape[0],))

  x_t = q_sample(d, x_start, t, noise)
  model_output = denoise_fn(x_t, _model_timesteps(d, t))
  zeros = jnp.zeros(x_start.shape[:1], jnp.float32)

  if loss_type is LossType.KL:
    vb, _ = _vb_terms_bpd(d, model_output, x_start, x_t, t, mean_type, var_type, False)
    return dict(loss=vb, mse=zeros, vb=vb)

  mean_output, var_output = split_model_output(model_output, x_t, var_type)
  target = _mse_target(d, x_start, x_t, t, noise, mean_type)
  mse = mean_flat(jnp.square(target - mean_output))
  if snr_gamma is not None:
    mse = mse * min_snr_weight(d, t, snr_gamma, mean_type)

  if loss_type is LossType.HYBRID or var_type.is_learned:
    # The bound trains only the variance: the mean output is frozen inside it.
    frozen = jax.lax.stop_gradient(mean_output)
    if var_output is not None:
      frozen = jnp.concatenate([frozen, var_output], axis=-1)
    vb, _ = _vb_terms_bpd(d, frozen, x_start, x_t, t, mean_type, var_type, False)
    # λ·L_vlb with L_vlb = T·E_t[L_t]: the per-example estimate of L_vlb is T·L_t.
    vb = vb * (vlb_weight * d.num_timesteps)
  else:
    vb = zeros
  return dict(loss=mse + vb, mse=mse, vb=vb)


def training_losses(d: GaussianDiffusion, denoise_fn: DenoiseFn, x_start: Array, t: Array,
                    noise: Array, *, loss_type: str | LossType, mean_type: str | MeanType,
                    var_type: str | VarType, snr_gamma: float | None = None,
                    vlb_weight: float = 1e-3) -> Array:
  """The per-example training loss `[B]` at timesteps t with noise ε.

  loss_type:
    'mse': L_simple, ‖target − model‖² averaged over dimensions, the target set by mean_type
      (ε, x₀, v, or μ̃). With a learned variance the bound term is added as for 'hybrid'.
    'kl': L_vlb's term L_t in bits/dim (the decoder NLL at t = 0).
    'hybrid': L_simple + λ·L_vlb, the bound computed with the mean output stopped, λ =
      `vlb_weight` (0.001) and L_vlb estimated by T·L_t (Nichol & Dhariwal 2021).
  snr_gamma: min-SNR-γ weighting of the MSE term (None: unweighted).
  """
  return training_loss_terms(d, denoise_fn, x_start, t, noise, loss_type=loss_type,
                             mean_type=mean_type, var_type=var_type, snr_gamma=snr_gamma,
                             vlb_weight=vlb_weight)['loss']


# ------------------------------------------------------------------------------------------
# Exact bits/dim.
# ------------------------------------------------------------------------------------------


def prior_bpd(d: GaussianDiffusion, x_start: Array) -> Array:
  """KL(q(x_T | x₀) ‖ N(0, I)) in bits/dim, `[B]`."""
  t = jnp.full(x_start.shape[:1], d.num_timesteps - 1, jnp.int32)
  mean, _, log_variance = q_mean_variance(d, x_start, t)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def calc_bpd_loop(d: GaussianDiffusion, denoise_fn: DenoiseFn, x_start: Array, rng: Array, *,
                  mean_type: str | MeanType, var_type: str | VarType, clip_denoised: bool = True,
                  timesteps_per_call: int = 8) -> dict[str, Array]:
  """Bits/dim of x₀ under the model: every term of the variational bound (paper eq. 5).

  The T terms are independent given x₀, so they are evaluated `timesteps_per_call` timesteps
  at a time, folded into one model call of batch `timesteps_per_call·B`, inside a single
  `lax.map`. Term t uses noise drawn from `fold_in(rng, t)`.

  Args:
    x_start: `[B, H, W, C]` data in [-1, 1] on the 256-level grid.
  Returns:
    dict with `total_bpd [B]`, `prior_bpd [B]`, `vb [B, T]`, `xstart_mse [B, T]`, `mse [B, T]`.
  """
  mean_type = MeanType.parse(mean_type)
  var_type = VarType.parse(var_type)
  big_t = d.num_timesteps
  b = x_start.shape[0]
  k = max(1, min(int(timesteps_per_call), big_t))
  num_calls = -(-big_t // k)
  # [num_calls, k]; the padding repeats the last timestep and is dropped below.
  ts = jnp.minimum(jnp.arange(num_calls * k, dtype=jnp.int32), big_t - 1).reshape(num_calls, k)

  def terms(t_chunk):  # t_chunk: [k]
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(rng, s), x_start.shape,
                                                 x_start.dtype))(t_chunk)  # [k, B, ...]
    noise = noise.reshape((k * b,) + x_start.shape[1:])
    x0 = jnp.broadcast_to(x_start, (k,) + x_start.shape).reshape(noise.shape)
    t = jnp.repeat(t_chunk, b)  # [k·B], timestep-major
    x_t = q_sample(d, x0, t, noise)
    model_output = denoise_fn(x_t, _model_timesteps(d, t))
    vb, out = _vb_terms_bpd(d, model_output, x0, x_t, t, mean_type, var_type, clip_denoised)
    xstart_mse = mean_flat(jnp.square(out['pred_xstart'] - x0))
    eps = predict_noise_from_start(d, x_t, t, out['pred_xstart'])
    mse = mean_flat(jnp.square(eps - noise))
    return jnp.stack([vb, xstart_mse, mse]).reshape(3, k, b)

  stacked = jax.lax.map(terms, ts)  # [num_calls, 3, k, B]
  stacked = jnp.moveaxis(stacked, 1, 0).reshape(3, num_calls * k, b)[:, :big_t]
  vb, xstart_mse, mse = (jnp.transpose(a) for a in stacked)  # each [B, T]
  prior = prior_bpd(d, x_start)
  return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb,
              xstart_mse=xstart_mse, mse=mse)
