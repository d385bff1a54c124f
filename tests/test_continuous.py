"""The continuous-time view against float64 NumPy re-derivations and the Gaussian closed form."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from diffusion_jax.process import continuous as ct
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import respacing

import oracles  # tests/ is on sys.path under pytest's rootdir conftest

T = 1000
MU, S = 0.3, 0.5


def _diffusion():
  return gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, T))


class NumpyProcess:
  """DPM-Solver's interpolation re-derived in float64 from the (float32-stored) betas."""

  def __init__(self, betas):
    ab = np.cumprod(1.0 - np.asarray(betas, np.float64))
    self.nodes = (np.arange(len(ab)) + 1.0) / len(ab)
    self.la = 0.5 * np.log(ab)

  def log_alpha(self, t):
    return np.interp(t, self.nodes, self.la)

  def alpha(self, t):
    return np.exp(self.log_alpha(t))

  def sigma2(self, t):
    return 1.0 - self.alpha(t) ** 2

  def lam(self, t):
    return self.log_alpha(t) - 0.5 * np.log(self.sigma2(t))


def _interior_times(rng, n):
  """Times strictly inside segments (away from the kinks), with the step for central
  differences."""
  seg = rng.integers(0, T - 1, n)
  frac = rng.uniform(0.2, 0.8, n)
  return (seg + 1 + frac) / T, 0.05 / T


def test_coefficients_match_numpy_float64():
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  d = _diffusion()
  p = ct.VPProcess.from_diffusion(d)
  ref = NumpyProcess(d.betas)
  t = np.concatenate([rng.uniform(1.0 / T, 1.0, 200), ref.nodes[[0, 1, 499, -2, -1]]])
  np.testing.assert_allclose(p.alpha(t), ref.alpha(t), rtol=2e-6, err_msg=f'seed {seed}')
  np.testing.assert_allclose(p.sigma(t), np.sqrt(ref.sigma2(t)), rtol=2e-5, err_msg=f'seed {seed}')
  np.testing.assert_allclose(p.lam(t), ref.lam(t), rtol=1e-5, atol=2e-5, err_msg=f'seed {seed}')
  # At the nodes α² is exactly ᾱ_n.
  np.testing.assert_allclose(p.alpha(ref.nodes) ** 2, np.exp(2 * ref.la), rtol=2e-6)
  # The inverse.
  np.testing.assert_allclose(p.t_of_lambda(jnp.asarray(ref.lam(t))), t, rtol=1e-4, atol=1e-6,
                             err_msg=f'seed {seed}')
  # The model's timestep.
  np.testing.assert_allclose(p.model_timestep(jnp.asarray(ref.nodes)), np.arange(T), atol=2e-3)
  assert float(p.lambda_max()) == pytest.approx(ref.lam(1.0 / T), rel=1e-5)
  assert float(p.lambda_min()) == pytest.approx(ref.lam(1.0), rel=1e-5)


def test_sde_coefficients_match_numpy_derivatives():
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  d = _diffusion()
  p = ct.VPProcess.from_diffusion(d)
  ref = NumpyProcess(d.betas)
  t, h = _interior_times(rng, 100)
  f_ref = (ref.log_alpha(t + h) - ref.log_alpha(t - h)) / (2 * h)
  ds2 = (ref.sigma2(t + h) - ref.sigma2(t - h)) / (2 * h)
  g2_ref = ds2 - 2 * f_ref * ref.sigma2(t)
  np.testing.assert_allclose(p.f(t), f_ref, rtol=1e-4, err_msg=f'seed {seed}')
  np.testing.assert_allclose(p.g2(t), g2_ref, rtol=1e-4, err_msg=f'seed {seed}')
  # β(t) = g² ≈ T·β_n in segment n (β_n small): the DDPM schedule read continuously.
  seg = np.floor(t * T).astype(int) - 1
  np.testing.assert_allclose(p.g2(t), T * np.asarray(d.betas, np.float64)[seg + 1], rtol=0.02)


def test_conversions_round_trip():
  seed = oracles.new_seed()
  k = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.normal(k[0], (6, 5))
  eps = jax.random.normal(k[1], (6, 5))
  alpha = jax.random.uniform(k[2], (6, 1), minval=0.01, maxval=0.999)
  sigma = jnp.sqrt(1 - alpha ** 2)
  x = alpha * x0 + sigma * eps
  v = ct.v_from_x0_eps(x0, eps, alpha, sigma)
  tol = dict(rtol=1e-4, atol=1e-4, err_msg=f'seed {seed}')
  np.testing.assert_allclose(ct.x0_from_eps(x, eps, alpha, sigma), x0, **tol)
  np.testing.assert_allclose(ct.eps_from_x0(x, x0, alpha, sigma), eps, **tol)
  np.testing.assert_allclose(ct.x0_from_v(x, v, alpha, sigma), x0, **tol)
  np.testing.assert_allclose(ct.eps_from_v(x, v, alpha, sigma), eps, **tol)
  np.testing.assert_allclose(ct.eps_from_score(ct.score_from_eps(eps, sigma), sigma), eps, **tol)
  # v agrees with the discrete library's definition at the nodes.
  d = _diffusion()
  n = jnp.array([0, 10, 500, 999, 3, 7])
  np.testing.assert_allclose(gd.get_v(d, x0, n, eps),
                             ct.v_from_x0_eps(x0, eps, d.sqrt_alphas_cumprod[n][:, None],
                                              d.sqrt_one_minus_alphas_cumprod[n][:, None]),
                             rtol=1e-5, atol=1e-6)


def test_drifts_transport_the_gaussian():
  """x₀ ~ N(μ, s²): p_t = N(αμ, α²s² + σ²) and the exact PF-ODE flow is
  x_{t'} = α'μ + √(v'/v)(x_t − αμ); its t'-derivative at t' = t must be the PF-ODE drift. The
  marginal variance obeys dv/dt = 2 f v + g² (forward Fokker–Planck), and the reverse-SDE drift
  is f x − g² s."""
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  d = _diffusion()
  p = ct.VPProcess.from_diffusion(d)
  ref = NumpyProcess(d.betas)
  t, h = _interior_times(rng, 16)
  x = rng.normal(size=(16, 3))

  def var(tt):
    return ref.alpha(tt) ** 2 * S ** 2 + ref.sigma2(tt)

  def flow(tt):  # the exact PF-ODE map from t to tt, [16, 3]
    return (ref.alpha(tt)[:, None] * MU
            + np.sqrt(var(tt) / var(t))[:, None] * (x - ref.alpha(t)[:, None] * MU))

  drift_ref = (flow(t + h) - flow(t - h)) / (2 * h)
  score = -(x - ref.alpha(t)[:, None] * MU) / var(t)[:, None]
  tj, xj, sj = (jnp.asarray(a, jnp.float32) for a in (t, x, score))
  np.testing.assert_allclose(ct.pf_ode_drift(p, xj, tj, sj), drift_ref, rtol=2e-3, atol=1e-4,
                             err_msg=f'seed {seed}')
  dv = (var(t + h) - var(t - h)) / (2 * h)
  np.testing.assert_allclose(2 * p.f(t) * var(t) + p.g2(t), dv, rtol=1e-3, atol=1e-6)
  f_ref = (ref.log_alpha(t + h) - ref.log_alpha(t - h)) / (2 * h)
  g2_ref = -2 * f_ref
  np.testing.assert_allclose(ct.reverse_sde_drift(p, xj, tj, sj),
                             f_ref[:, None] * x - g2_ref[:, None] * score, rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(ct.reverse_sde_diffusion(p, tj), np.sqrt(g2_ref), rtol=1e-3)


def gaussian_denoise_fn(p, mean_type, extra_channels=0):
  """The exact model of x₀ ~ N(μ, s²) as `denoise_fn(x, model_timestep)`, output as
  `mean_type`, with `extra_channels` junk channels appended (a learned variance)."""
  return oracles.gaussian_denoise_fn(oracles.process_alpha_sigma(p), MU, S, mean_type,
                                     extra_channels)


def test_make_denoiser_mean_types_agree_and_ignore_variance_channels():
  seed = oracles.new_seed()
  p = ct.VPProcess.from_diffusion(_diffusion())
  x = jax.random.normal(jax.random.key(seed), (5, 2, 2, 3))
  t = jnp.array([1.0 / T, 0.01, 0.3, 0.77, 1.0])
  outs = {}
  for mt in ('eps', 'xstart', 'v'):
    den = ct.make_denoiser(p, gaussian_denoise_fn(p, mt, extra_channels=3), mt)
    outs[mt] = jax.jit(den)(x, t)
  for mt in ('xstart', 'v'):
    for k in range(2):
      np.testing.assert_allclose(outs[mt][k], outs['eps'][k], rtol=1e-4, atol=1e-4,
                                 err_msg=f'{mt} seed {seed}')
  # The exact posterior mean of the Gaussian data, in float64. Near t = 1 the ε → x₀ conversion
  # divides float32 rounding by α(t) ≈ 0.006, so the tolerance grows as 1/α there.
  a = np.asarray(p.alpha(t), np.float64)[:, None, None, None]
  x64 = np.asarray(x, np.float64)
  want = MU + a * S ** 2 / (a ** 2 * S ** 2 + 1 - a ** 2) * (x64 - a * MU)
  err = np.abs(np.asarray(outs['eps'][0], np.float64) - want)
  np.testing.assert_array_less(err, 1e-5 + 1e-4 * np.abs(want) + 1e-6 / a,
                               err_msg=f'seed {seed}')


def test_bad_inputs_raise_one_line_errors():
  d = _diffusion()
  p = ct.VPProcess.from_diffusion(d)
  # xprev (a DDPM step's mean) has a denoiser on the VP process only.
  ve_den = ct.make_denoiser(ct.VEProcess(), lambda x, t: x, 'xprev')
  with pytest.raises(ValueError, match=r"^mean_type 'xprev' predicts a DDPM step's mean: it "
                     r"needs the 'vp' process, not 've'") as e:
    ve_den(jnp.zeros((1, 2)), jnp.ones((1,)))
  oracles.assert_one_line_error(e.value)
  with pytest.raises(ValueError, match="unknown mean_type 'noise'"):
    ct.make_denoiser(p, lambda x, t: x, 'noise')
  with pytest.raises(ValueError, match='full process'):
    ct.VPProcess.from_diffusion(respacing.respace(d, respacing.space_timesteps(T, 10)))
  den = ct.make_denoiser(p, lambda x, t: jnp.concatenate([x, x, x], -1), 'eps')
  with pytest.raises(ValueError, match='expected 2 or 4'):
    den(jnp.zeros((1, 2)), jnp.ones((1,)))
