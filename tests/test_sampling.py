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
    fn = oracles.gaussian_denoise_fn(
        oracles.process_alpha_sigma(self.process), MU, S, self.mean_type,
        extra_channels=x.shape[-1] if self.learned_variance else 0,
        extra_value=123.0)  # a learned variance's channels: must be ignored
    return fn(x, jnp.asarray(t, jnp.float32))


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


def test_xprev_and_bad_options_are_one_line_errors():
  with pytest.raises(ValueError, match="mean_type 'xprev' has no continuous-time"):
    _run(sampler_config.SamplerConfig('heun', steps=5), 'xprev', 'fixedlarge', n=8)
  bad = [(dict(kind='rk4'), "unknown sampler 'rk4'; allowed: ddpm, ddim, euler, heun"),
         (dict(kind='euler', step_schedule='cubic'), "'cubic'"),
         (dict(kind='ddim', step_schedule='karras'), 'applies to the solvers'),
         (dict(kind='ode', steps=10), 'chooses its own steps'),
         (dict(kind='euler', churn=1.0), 'heun only'),
         (dict(kind='heun', steps=0), 'positive integer')]
  for kwargs, fragment in bad:
    with pytest.raises(ValueError) as e:
      sampler_config.SamplerConfig(**kwargs)
    oracles.assert_one_line_error(e.value, fragment)
  with pytest.raises(ValueError, match=r'steps must be in \[1, 1000\]'):
    sampler_config.SamplerConfig('dpmpp_2m', steps=1001).check_steps(T)
  assert sampler_config.SamplerConfig.from_dict(
      sampler_config.SamplerConfig('heun', steps=7, churn=0.5).to_dict()).churn == 0.5
