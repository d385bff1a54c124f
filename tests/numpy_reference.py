"""Float64 NumPy re-derivations of the DDPM mathematics, written from the papers.

Nothing here imports ``diffusion_jax``: these are the independent numbers the tests compare the
library against. Sources: Ho et al. 2020 (DDPM, eqs. 4-7, 11-12 and sec. 3.3), Nichol & Dhariwal
2021 (improved DDPM, eqs. 13-17), Song et al. 2021 (DDIM, eq. 12), Lin et al. 2024 (zero terminal
SNR, Algorithm 1), Hang et al. 2023 (min-SNR-gamma weighting).

Index convention: ``t`` is 0-indexed, so ``t = 0`` is the paper's t = 1: ``alphas_cumprod[0]`` is
the paper's alpha-bar_1 and ``alphas_cumprod_prev[0] = 1`` is its alpha-bar_0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Beta schedules.
# ----------------------------------------------------------------------------------------------


def beta_schedule(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                  s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """[T] float64 betas, one loop per schedule so each is readable on its own."""
  i = np.arange(T, dtype=np.float64)
  if name == "linear":
    # beta_i = beta_start + i (beta_end - beta_start) / (T - 1).
    if T == 1:
      return np.array([beta_start])
    return beta_start + i * (beta_end - beta_start) / (T - 1)
  if name == "quad":
    if T == 1:
      return np.array([beta_start])
    root = math.sqrt(beta_start) + i * (math.sqrt(beta_end) - math.sqrt(beta_start)) / (T - 1)
    return root * root
  if name == "const":
    return np.full(T, beta_end)
  if name == "jsd":
    # 1/T, 1/(T-1), ..., 1/1.
    return 1.0 / (T - i)
  if name in ("warmup10", "warmup50"):
    frac = 0.1 if name == "warmup10" else 0.5
    n = int(T * frac)
    out = np.full(T, beta_end)
    for k in range(n):
      out[k] = beta_start if n == 1 else beta_start + k * (beta_end - beta_start) / (n - 1)
    return out
  if name == "cosine":
    def f(tt):
      return math.cos((tt / T + s) / (1.0 + s) * math.pi / 2.0) ** 2
    abar = [f(k) / f(0) for k in range(T + 1)]
    return np.array([min(1.0 - abar[k + 1] / abar[k], max_beta) for k in range(T)])
  if name == "sigmoid":
    if T == 1:
      z = np.array([-6.0])
    else:
      z = -6.0 + i * 12.0 / (T - 1)
    return (1.0 / (1.0 + np.exp(-z))) * (beta_end - beta_start) + beta_start
  raise KeyError(name)


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024, Alg. 1: shift sqrt(alpha-bar) to end at 0, scale to keep the first."""
  r = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = r[0], r[-1]
  r_new = (r - last) * (first / (first - last))
  abar = r_new ** 2
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  return 1.0 - abar / abar_prev


# ----------------------------------------------------------------------------------------------
# Process coefficients.
# ----------------------------------------------------------------------------------------------


class Coefs:
  """Every per-timestep quantity, float64, named as in the papers."""

  def __init__(self, betas):
    b = np.asarray(betas, np.float64)
    T = b.shape[0]
    self.T = T
    self.betas = b
    self.alphas = 1.0 - b
    ab = np.cumprod(self.alphas)
    self.alphas_cumprod = ab
    self.alphas_cumprod_prev = np.concatenate([[1.0], ab[:-1]])
    self.alphas_cumprod_next = np.concatenate([ab[1:], [0.0]])
    one_minus = 1.0 - ab
    # 1 - alpha-bar without cancellation in the first steps: -expm1(sum log1p(-b)).
    with np.errstate(divide="ignore"):
      one_minus = -np.expm1(np.cumsum(np.log1p(-b)))
    self.one_minus_alphas_cumprod = one_minus
    self.sqrt_alphas_cumprod = np.sqrt(ab)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(one_minus)
    with np.errstate(divide="ignore"):
      self.log_one_minus_alphas_cumprod = np.log(one_minus)
      self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ab)
      self.sqrt_recipm1_alphas_cumprod = np.sqrt(one_minus / ab)
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    # beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)   (DDPM eq. 7)
    self.posterior_variance = b * one_minus_prev / one_minus
    pv_clip = np.concatenate([[self.posterior_variance[1]], self.posterior_variance[1:]]) \
        if T > 1 else self.posterior_variance.copy()
    self.posterior_log_variance_clipped = np.log(pv_clip)
    # mu-tilde = coef1 x0 + coef2 x_t   (DDPM eq. 7)
    self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / one_minus
    self.posterior_mean_coef2 = one_minus_prev * np.sqrt(self.alphas) / one_minus
    # Fixed-large variance: beta_t, except index 0 gets beta-tilde at index 1.
    self.fixedlarge_variance = np.concatenate([[self.posterior_variance[1]], b[1:]]) \
        if T > 1 else b.copy()
    self.snr = ab / one_minus


def bcast(v: np.ndarray, t: np.ndarray, ndim: int) -> np.ndarray:
  """v[t] reshaped to [B, 1, ..., 1] for an x of rank ``ndim``."""
  return v[t].reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------
# Forward process, posterior, model distribution.
# ----------------------------------------------------------------------------------------------


def q_sample(c: Coefs, x0, t, noise):
  n = x0.ndim
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  return a * x0 + sig * noise


def q_posterior(c: Coefs, x0, xt, t):
  n = x0.ndim
  mean = bcast(c.posterior_mean_coef1, t, n) * x0 + bcast(c.posterior_mean_coef2, t, n) * xt
  var = np.broadcast_to(bcast(c.posterior_variance, t, n), xt.shape)
  logvar = np.broadcast_to(bcast(c.posterior_log_variance_clipped, t, n), xt.shape)
  return mean, var, logvar


def x0_from_eps(c: Coefs, xt, t, eps):
  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps  solved for x0.
  n = xt.ndim
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  return (xt - sig * eps) / a


def x0_from_v(c: Coefs, xt, t, v):
  # v = a eps - sig x0, x_t = a x0 + sig eps, a^2 + sig^2 = 1  =>  x0 = a x_t - sig v.
  n = xt.ndim
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  return a * xt - sig * v


def eps_from_x0(c: Coefs, xt, t, x0):
  n = xt.ndim
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  return (xt - a * x0) / sig


MEAN_TYPES = ("eps", "xstart", "v", "xprev")
VAR_TYPES = ("fixedsmall", "fixedlarge", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")


def p_mean_variance(c: Coefs, out, xt, t, mean_type, var_type, clip):
  """Returns dict mean, variance, log_variance, pred_xstart and an error 'scale' per field.

  The scales are |term| sums of the float64 expression, so a float32 implementation is
  expected within a few ulps times the scale.
  """
  n = xt.ndim
  C = xt.shape[-1]
  if var_type in ("learned", "learned_range"):
    assert out.shape[-1] == 2 * C
    out, var_out = out[..., :C], out[..., C:]
  if var_type == "fixedsmall":
    var = np.broadcast_to(bcast(c.posterior_variance, t, n), xt.shape)
    logvar = np.broadcast_to(bcast(c.posterior_log_variance_clipped, t, n), xt.shape)
    logvar_scale = np.abs(logvar)
  elif var_type == "fixedlarge":
    var = np.broadcast_to(bcast(c.fixedlarge_variance, t, n), xt.shape)
    logvar = np.log(var)
    logvar_scale = np.abs(logvar)
  elif var_type == "learned":
    logvar = var_out
    var = np.exp(logvar)
    logvar_scale = np.abs(logvar)
  elif var_type == "learned_range":
    lo = bcast(c.posterior_log_variance_clipped, t, n)
    hi = bcast(np.log(c.betas), t, n)
    frac = (var_out + 1.0) / 2.0
    logvar = frac * hi + (1.0 - frac) * lo
    var = np.exp(logvar)
    logvar_scale = np.abs(frac * hi) + np.abs((1.0 - frac) * lo) + np.abs(hi) + np.abs(lo)
  else:
    raise KeyError(var_type)

  c1 = bcast(c.posterior_mean_coef1, t, n)
  c2 = bcast(c.posterior_mean_coef2, t, n)
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  if mean_type == "xprev":
    x0 = (out - c2 * xt) / c1
    x0_scale = (np.abs(out) + np.abs(c2 * xt)) / c1
    if clip:
      x0 = np.clip(x0, -1, 1)
    mean = out
    mean_scale = np.abs(out)
  else:
    if mean_type == "eps":
      x0 = (xt - sig * out) / a
      x0_scale = (np.abs(xt) + np.abs(sig * out)) / a
    elif mean_type == "xstart":
      x0 = out
      x0_scale = np.abs(out)
    elif mean_type == "v":
      x0 = a * xt - sig * out
      x0_scale = np.abs(a * xt) + np.abs(sig * out)
    else:
      raise KeyError(mean_type)
    if clip:
      x0 = np.clip(x0, -1, 1)
    mean = c1 * x0 + c2 * xt
    mean_scale = c1 * (np.abs(x0) + x0_scale) + np.abs(c2 * xt)
  return dict(mean=mean, variance=var, log_variance=logvar, pred_xstart=x0,
              scale_mean=mean_scale, scale_pred_xstart=x0_scale, scale_log_variance=logvar_scale)


# ----------------------------------------------------------------------------------------------
# Likelihood pieces.
# ----------------------------------------------------------------------------------------------


def normal_kl(m1, lv1, m2, lv2):
  """KL(N(m1, e^lv1) || N(m2, e^lv2)), elementwise, nats."""
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def discretized_gaussian_loglik(x, means, log_scales):
  """log P(bin of x) under N(means, exp(log_scales)^2), bins of width 2/255, open end bins."""
  x, means, log_scales = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (x, means, log_scales)))
  sd = np.exp(log_scales)
  upper = (x - means + 1.0 / 255.0) / sd
  lower = (x - means - 1.0 / 255.0) / sd
  # Use log-CDFs / survival functions so tails are accurate in float64.
  log_cdf_upper = stats.norm.logcdf(upper)
  log_sf_lower = stats.norm.logsf(lower)
  mid = np.log(np.maximum(special.ndtr(upper) - special.ndtr(lower), 1e-300))
  # For bins far in the right tail, the difference of survival functions is more accurate.
  sf_mid = np.log(np.maximum(stats.norm.sf(lower) - stats.norm.sf(upper), 1e-300))
  mid = np.where(lower > 0, sf_mid, mid)
  return np.where(x < -0.999, log_cdf_upper, np.where(x > 0.999, log_sf_lower, mid))


def mean_flat(x):
  return np.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(c: Coefs, x0, xt, t, out, mean_type, var_type, clip):
  """L_t in bits/dim: KL for t > 0, decoder NLL for t == 0. Returns [B]."""
  true_mean, _, true_logvar = q_posterior(c, x0, xt, t)
  p = p_mean_variance(c, out, xt, t, mean_type, var_type, clip)
  kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / LOG2
  nll = -mean_flat(discretized_gaussian_loglik(x0, p["mean"], 0.5 * p["log_variance"])) / LOG2
  return np.where(t == 0, nll, kl)


def training_loss(c: Coefs, out, x0, t, noise, loss_type, mean_type, var_type, snr_gamma=None):
  """Per-example loss [B] (float64)."""
  xt = q_sample(c, x0, t, noise)
  C = x0.shape[-1]
  learned = var_type in ("learned", "learned_range")
  if loss_type == "kl":
    return vb_terms_bpd(c, x0, xt, t, out, mean_type, var_type, clip=False)
  if mean_type == "eps":
    target = noise
  elif mean_type == "xstart":
    target = x0
  elif mean_type == "v":
    target = q_v(c, x0, t, noise)
  elif mean_type == "xprev":
    target = q_posterior(c, x0, xt, t)[0]
  mse = mean_flat((target - out[..., :C]) ** 2)
  if snr_gamma is not None:
    snr = c.snr[t]
    w = np.minimum(snr, snr_gamma)
    if mean_type == "eps":
      w = w / snr
    elif mean_type == "v":
      w = w / (snr + 1.0)
    mse = mse * w
  # 'hybrid' always adds the bound term (with a fixed variance it carries no gradient); 'mse'
  # adds it only when the variance is learned (improved DDPM).
  if loss_type == "hybrid" or (learned and loss_type == "mse"):
    mse = mse + vb_terms_bpd(c, x0, xt, t, out, mean_type, var_type, clip=False) * (c.T / 1000.0)
  return mse


def q_v(c: Coefs, x0, t, noise):
  n = x0.ndim
  a = bcast(c.sqrt_alphas_cumprod, t, n)
  sig = bcast(c.sqrt_one_minus_alphas_cumprod, t, n)
  return a * noise - sig * x0


# ----------------------------------------------------------------------------------------------
# The Gaussian-data oracle: every coordinate of x0 iid N(mu, s^2).
# ----------------------------------------------------------------------------------------------


def oracle_eps_gain(abar, s):
  """E[eps | x_t] = k (x_t - a mu) with k = sigma / (a^2 s^2 + sigma^2)."""
  a2 = abar
  sig2 = 1.0 - abar
  return math.sqrt(sig2) / (a2 * s * s + sig2)


def oracle_x0_affine(abar, mu, s):
  """E[x0 | x_t] = g x_t + h = (a s^2 x_t + sigma^2 mu) / (a^2 s^2 + sigma^2).

  The same as (x_t - sigma E[eps|x_t]) / a, but finite at alpha-bar = 0 (where it is mu).
  """
  a = math.sqrt(abar)
  sig2 = 1.0 - abar
  den = abar * s * s + sig2
  return a * s * s / den, sig2 * mu / den


def oracle_affine_ancestral(coefs: Coefs, mu, s, var_type):
  """Composes the exact ancestral steps (x_prev = A x + b + sd z) from x_T ~ N(0, 1).

  Steps run t = T-1 ... 0 on ``coefs``; for a respaced process pass the respaced coefficients
  (the oracle, fed the original timestep, sees the same alpha-bar). Returns the mean and variance
  of x_0 and a dict t -> (mean, var) of the x_t fed to step t.
  """
  m, v = 0.0, 1.0
  before = {}
  for t in range(coefs.T - 1, -1, -1):
    before[t] = (m, v)
    ab = coefs.alphas_cumprod[t]
    g, h = oracle_x0_affine(ab, mu, s)   # x0_hat = g x + h
    c1, c2 = coefs.posterior_mean_coef1[t], coefs.posterior_mean_coef2[t]
    A = c1 * g + c2
    b = c1 * h
    if t == 0:
      sd2 = 0.0
    elif var_type == "fixedsmall":
      sd2 = coefs.posterior_variance[t]
    elif var_type == "fixedlarge":
      sd2 = coefs.fixedlarge_variance[t]
    else:
      raise KeyError(var_type)
    m, v = A * m + b, A * A * v + sd2
  return m, v, before


def oracle_affine_ddim(abar_seq, mu, s, eta):
  """Exact DDIM chain for Gaussian data over the kept alpha-bars ``abar_seq`` (ascending t).

  x_prev = sqrt(ab_p) x0_hat + sqrt(1 - ab_p - sigma^2) eps_hat + sigma z, ab_p = 1 after the
  first kept step. Returns mean and variance of the output when x_T ~ N(0, 1).
  """
  m, v = 0.0, 1.0
  abar_seq = list(abar_seq)
  for i in range(len(abar_seq) - 1, -1, -1):
    ab = abar_seq[i]
    ab_p = abar_seq[i - 1] if i > 0 else 1.0
    a = math.sqrt(ab)
    k = oracle_eps_gain(ab, s)
    # eps_hat = k x - k a mu ; x0_hat = (x - sig eps_hat) / a = g0 x + h0
    ge, he = k, -k * a * mu
    g0, h0 = oracle_x0_affine(ab, mu, s)
    sigma = eta * math.sqrt((1.0 - ab_p) / (1.0 - ab)) * math.sqrt(1.0 - ab / ab_p)
    dir_coef = math.sqrt(max(1.0 - ab_p - sigma * sigma, 0.0))
    A = math.sqrt(ab_p) * g0 + dir_coef * ge
    b = math.sqrt(ab_p) * h0 + dir_coef * he
    m, v = A * m + b, A * A * v + sigma * sigma
  return m, v
