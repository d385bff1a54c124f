"""Sampling from a model: every sampler of `SamplerConfig`, through `sampler_lib.sample_fn` and
the data-parallel runner, on a 'model' that is the exact denoiser of Gaussian data.

Data x₀ ~ N(μ, s²) in every coordinate; the model returns the exact ε̂(x_t, n) =
(x_t − α μ_x0)/σ-style posterior noise at its (possibly fractional) timestep n, with α, σ
interpolated as `continuous.VPProcess` does (so the continuous solvers see the exact
denoiser). Every sampler must then reproduce μ and s.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import continuous
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.process import schedules

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

MU, S = 0.3, 0.5
T = 1000


class ExactGaussianModel(nn.Module):
  """ε̂, x̂₀ or v̂ of N(MU, S²) data at model timestep n: the U-Net's call signature."""
  process: continuous.VPProcess
  mean_type: str = 'eps'
  learned_variance: bool = False

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    if self.mean_type == 'xprev':
      return _exact_xprev(self.process, x, jnp.asarray(t, jnp.float32))
    fn = oracles.gaussian_denoise_fn(
        oracles.process_alpha_sigma(self.process), MU, S, self.mean_type,
        extra_channels=x.shape[-1] if self.learned_variance else 0,
        extra_value=123.0)  # a learned variance's channels: must be ignored
    return fn(x, jnp.asarray(t, jnp.float32))


def _exact_xprev(process, x, n):
  """Ho's posterior mean μ̃ = c₀ x₀ + c_x x_t of the step from timestep n to n − 1, with the
  exact x₀ of N(MU, S²) data: at an integer n, DDPM's float64 tables (`posterior_mean_coef1/2`,
  ᾱ_{−1} = 1); at a fractional n (the continuous solvers' times), the same formula with ᾱ of
  the interpolated process at n and n − 1."""
  alpha_sigma = oracles.process_alpha_sigma(process)
  x0 = oracles.gaussian_denoise_fn(alpha_sigma, MU, S, 'xstart')(x, n)
  betas = schedules.get_beta_schedule('linear', T)
  ab = np.cumprod(1.0 - betas)
  ab_prev = np.append(1.0, ab[:-1])
  coef1 = jnp.asarray(betas * np.sqrt(ab_prev) / (1.0 - ab), jnp.float32)
  coef2 = jnp.asarray((1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab), jnp.float32)
  k = jnp.clip(jnp.round(n), 0, T - 1).astype(jnp.int32)
  a_t = alpha_sigma(n)[0]
  a_s = jnp.where(n < 0.5, 1.0, alpha_sigma(n - 1.0)[0])
  ab_t, ab_s = a_t ** 2, a_s ** 2
  c0 = (1.0 - ab_t / ab_s) * a_s / (1.0 - ab_t)
  cx = (1.0 - ab_s) * (a_t / a_s) / (1.0 - ab_t)
  integer = n == k
  c0, cx = jnp.where(integer, coef1[k], c0), jnp.where(integer, coef2[k], cx)
  shape = (-1,) + (1,) * (x.ndim - 1)
  return jnp.reshape(c0, shape) * x0 + jnp.reshape(cx, shape) * x


def _run(sampler, mean_type='eps', var_type='fixedlarge', n=2048, learned=False, seed=None):
  d = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  process = continuous.VPProcess.from_diffusion(d)
  model = ExactGaussianModel(process, mean_type, learned)
  fn = sampler_lib.sample_fn(model, d, parameterization=gd.Parameterization(mean_type, var_type),
                          sampler=sampler)
  run = sampler_lib.data_parallel_sampler(fn, helpers.mesh(8), (2, 2, 1))
  seed = oracles.new_seed() if seed is None else seed
  images, nfe = run({}, jax.random.PRNGKey(seed), np.zeros(n, np.int32))
  return np.asarray(images), np.asarray(nfe)


# Tolerances on the mean and relative std: the sampling error of 32,768 values (std 0.39%)
# plus each method's truncation error at these steps (in the std, from a float64 re-derivation
# of the solvers on this denoiser: DDIM-250 −1.2%, Euler-250 −1.2%, Heun-30 +1.9%, 2M-20
# +1.3%, 3M-20 −2.9%, PC +1.3%; first order at 50 or 40 steps is −5.6% or −7%, hence more
# steps here; tests/test_solvers.py measures the orders). Each tolerance is at least 4.4
# standard errors beyond the bias: with 8,192 values and 3% for Heun and 4% for 3M, one run in
# six failed somewhere by chance.
@pytest.mark.parametrize('config,nfe,tolerance', [
    (dict(kind='ddpm'), T, 0.03),
    (dict(kind='ddim', steps=250), 250, 0.03),
    (dict(kind='euler', steps=250), 251, 0.03),
    (dict(kind='heun', steps=30), 61, 0.04),
    (dict(kind='dpmpp_2m', steps=20), 21, 0.03),
    (dict(kind='dpmpp_3m', steps=20, step_schedule='karras'), 21, 0.05),
    (dict(kind='sde', steps=T), T + 1, 0.04),
    (dict(kind='pc', steps=T), 2 * T + 1, 0.04),
    (dict(kind='ode', rtol=1e-4), None, 0.03),
])
@pytest.mark.slow
def test_every_sampler_reproduces_gaussian_data(config, nfe, tolerance):
  sampler = sampler_config.SamplerConfig(**config, clip_denoised=False)
  images, evaluations = _run(sampler, n=8192)
  assert images.shape == (8192, 2, 2, 1)
  mean, std = images.mean(), images.std()
  print(config, f'mean {mean:.4f} std {std:.4f} evaluations {evaluations}')
  assert abs(mean - MU) < tolerance and abs(std / S - 1) < tolerance, (mean, std)
  if nfe is None:
    assert 20 < evaluations.min() <= evaluations.max() < 1000
  else:
    assert (evaluations == nfe).all() and sampler.num_evaluations(T) == nfe


@pytest.mark.slow
@pytest.mark.parametrize('mean_type', ['xstart', 'v'])
def test_solvers_read_every_parameterisation_and_ignore_variance_channels(mean_type):
  # A deterministic solver from the same noise: the same samples whatever the model predicts.
  sampler = sampler_config.SamplerConfig('dpmpp_2m', steps=10, clip_denoised=False)
  seed = oracles.new_seed()
  eps, _ = _run(sampler, 'eps', n=64, seed=seed)
  other, _ = _run(sampler, mean_type, 'learned_range', n=64, learned=True, seed=seed)
  np.testing.assert_allclose(other, eps, atol=1e-4, err_msg=f'seed {seed}')


# An xprev model (Ho's posterior mean μ̃ of one step) on a VP process: every sampler reads it
# (`make_denoiser` turns μ̃ into x̂₀) and, from the same noise, samples as the ε model does.
# Before the registry the solvers refused xprev. x̂₀ = (μ̃ − c_x x)/c₀ is ill-conditioned where
# c₀ is small (c₀ ≈ 1e-4 at n = 999), so a float32 x̂₀ is good to ~1e-4 there; the tolerances
# are ~4× what a float32 conversion with 1 − ᾱ as −expm1(2 log α) reaches (heun 4.4e-4, ddim
# 7.7e-5, ddpm 1.1e-5 over 512 samples).
@pytest.mark.parametrize('config,atol', [
    (dict(kind='heun', steps=5), 2e-3),   # fractional timesteps: the interpolated process's μ̃
    (dict(kind='ddim', steps=50), 3e-4),  # DDPM's own timesteps: Ho's float64 tables
    (dict(kind='ddpm', steps=50), 5e-5),
])
def test_xprev_models_sample_as_their_eps_twins(config, atol):
  sampler = sampler_config.SamplerConfig(**config, clip_denoised=False)
  seed = oracles.new_seed()
  eps, nfe_eps = _run(sampler, 'eps', n=64, seed=seed)
  xprev, nfe_xprev = _run(sampler, 'xprev', 'fixedlarge', n=64, seed=seed)
  assert (nfe_xprev == nfe_eps).all()
  np.testing.assert_allclose(xprev, eps, atol=atol, rtol=0, err_msg=f'seed {seed}')


def test_ddim_on_any_step_schedule_is_euler_in_sigma():
  # DDIM (η = 0) takes every step schedule now (it was respaced-only): over the same times it
  # is Euler's step on x̃ = x/α in σ̃ = σ/α, so N + 1 levels of ddim equal N steps of euler.
  seed = oracles.new_seed()
  for schedule in ('karras', 'logsnr', 'time_uniform'):
    ddim, nfe_ddim = _run(sampler_config.SamplerConfig(
        'ddim', steps=11, step_schedule=schedule, clip_denoised=False), n=64, seed=seed)
    euler, nfe_euler = _run(sampler_config.SamplerConfig(
        'euler', steps=10, step_schedule=schedule, clip_denoised=False), n=64, seed=seed)
    assert (nfe_ddim == 11).all() and (nfe_euler == 11).all()
    np.testing.assert_allclose(ddim, euler, atol=1e-5, rtol=0,
                               err_msg=f'{schedule}, seed {seed}')


def test_xprev_off_vp_and_bad_options_are_one_line_errors():
  d = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  ve = continuous.make_process('ve', sigma_min=0.01, sigma_max=50.0)
  fn = sampler_lib.sample_fn(ExactGaussianModel(continuous.VPProcess.from_diffusion(d)), d,
                             parameterization=gd.Parameterization('xprev', 'fixedlarge'),
                             sampler=sampler_config.SamplerConfig('heun', steps=5), process=ve)
  with pytest.raises(ValueError) as e:
    fn({}, jax.random.PRNGKey(0), None, (8, 2, 2, 1))
  oracles.assert_one_line_error(e.value, "mean_type 'xprev'", "needs the 'vp' process, not 've'")
  bad = [(dict(kind='rk4'), "unknown sampler 'rk4'; allowed: ddpm, ddim, euler, heun"),
         (dict(kind='euler', step_schedule='cubic'), "'cubic'"),
         (dict(kind='ode', step_schedule='karras'),
          "step_schedule applies to the fixed-step samplers, not 'ode'"),
         (dict(kind='ode', steps=10), 'chooses its own steps'),
         (dict(kind='euler', churn=1.0), "churn applies to the heun sampler only, not 'euler'"),
         (dict(kind='ddpm', eta=0.5), "eta applies to the ddim sampler only, not 'ddpm'"),
         (dict(kind='heun', steps=0), 'positive integer')]
  for kwargs, fragment in bad:
    with pytest.raises(ValueError) as e:
      sampler_config.SamplerConfig(**kwargs)
    oracles.assert_one_line_error(e.value, fragment)
  with pytest.raises(ValueError, match=r'steps must be in \[1, 1000\]'):
    sampler_config.SamplerConfig('dpmpp_2m', steps=1001).check_steps(T)
  assert sampler_config.SamplerConfig.from_dict(
      sampler_config.SamplerConfig('heun', steps=7, churn=0.5).to_dict()).churn == 0.5
