"""The VE and sub-VP processes, their solvers and NCSN's annealed Langevin dynamics, on analytic
Gaussian data x₀ ~ N(μ, s²) per coordinate, whose perturbed marginal is N(αμ, α²s² + σ²) and
whose exact denoiser is known in closed form (and on correlated N(μ, Σ) for the likelihood).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.process import continuous as ct
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import likelihood as ol
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers as sv

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

MU, S = 0.3, 0.5
SIGMA_MIN, SIGMA_MAX = 0.01, 10.0
BETA_MIN, BETA_MAX = 0.1, 20.0


def _ve():
  return ct.VEProcess(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


def _subvp():
  return ct.SubVPProcess(beta_min=BETA_MIN, beta_max=BETA_MAX, t_min=1e-3)


PROCESSES = {'ve': _ve, 'subvp': _subvp, 'flow': ct.FlowProcess}


def _gaussian_denoise_fn(p, mean_type='eps', mu=MU, s=S):
  """The exact network of x₀ ~ N(mu, s²) as `denoise_fn(c_in·x, model_timestep)`."""
  return helpers.gaussian_denoise_fn(p, mu, s, mean_type)


# ------------------------------------------------------------------------------------------
# Float64 closed forms.
# ------------------------------------------------------------------------------------------


class NumpyVE:
  def alpha(self, t):
    return np.ones_like(t)

  def sigma(self, t):
    return SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t


class NumpySubVP:
  def _b(self, t):
    return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t ** 2

  def alpha(self, t):
    return np.exp(-0.5 * self._b(t))

  def sigma(self, t):
    return 1.0 - np.exp(-self._b(t))


NUMPY = {'ve': NumpyVE, 'subvp': NumpySubVP}


@pytest.mark.parametrize('name', ['ve', 'subvp'])
def test_marginals_match_float64_closed_forms(name):
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    p, ref = PROCESSES[name](), NUMPY[name]()
    t = np.concatenate([rng.uniform(p.t_min, 1.0, 200), [p.t_min, 1.0]])
    a, sg = ref.alpha(t), ref.sigma(t)
    lam = np.log(a) - np.log(sg)
    np.testing.assert_allclose(p.alpha(t), a, rtol=1e-12, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.sigma(t), sg, rtol=1e-12, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.lam(t), lam, rtol=1e-12, atol=1e-12, err_msg=f'seed {seed}')
    # λ → t, α, σ (what the solvers in λ use).
    np.testing.assert_allclose(p.t_of_lambda(jnp.asarray(lam)), t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.log_alpha_of_lambda(jnp.asarray(lam)), np.log(a), atol=1e-12)
    np.testing.assert_allclose(p.log_sigma_of_lambda(jnp.asarray(lam)), np.log(sg), rtol=1e-12,
                               atol=1e-12)
    # d log σ/dλ and the SDE's f = d log α/dt, g² = dσ²/dt − 2fσ², by central differences.
    ti = rng.uniform(p.t_min + 1e-3, 1.0 - 1e-3, 100)
    h = 1e-6
    dla = (np.log(ref.alpha(ti + h)) - np.log(ref.alpha(ti - h))) / (2 * h)
    ds2 = (ref.sigma(ti + h) ** 2 - ref.sigma(ti - h) ** 2) / (2 * h)
    np.testing.assert_allclose(p.f(ti), dla, rtol=1e-6, atol=1e-9, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.g2(ti), ds2 - 2 * dla * ref.sigma(ti) ** 2, rtol=1e-6,
                               err_msg=f'seed {seed}')
    li = np.log(ref.alpha(ti)) - np.log(ref.sigma(ti))
    dls = ((np.log(ref.sigma(ti + h)) - np.log(ref.sigma(ti - h)))
           / (np.log(ref.alpha(ti + h) / ref.sigma(ti + h))
              - np.log(ref.alpha(ti - h) / ref.sigma(ti - h))))
    np.testing.assert_allclose(p.dlog_sigma_dlambda(jnp.asarray(li)), dls, rtol=1e-6)
    # q(x_t | x₀) and the prior.
    x0 = rng.normal(size=(6, 3))
    noise = rng.normal(size=(6, 3))
    tt = t[:6]
    np.testing.assert_allclose(p.q_sample(jnp.asarray(x0), jnp.asarray(tt), jnp.asarray(noise)),
                               ref.alpha(tt)[:, None] * x0 + ref.sigma(tt)[:, None] * noise,
                               rtol=1e-12)
    sd = SIGMA_MAX if name == 've' else 1.0
    np.testing.assert_allclose(p.prior_logp(jnp.asarray(x0 * sd)),
                               stats.norm(0, sd).logpdf(x0 * sd).sum(-1), rtol=1e-12)
    xs = p.prior_sample(jax.random.key(seed), (20000, 4), jnp.float64)
    assert float(jnp.std(xs)) == pytest.approx(sd, rel=0.02), seed


# ------------------------------------------------------------------------------------------
# The solvers on the new processes.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind,options,steps,order', oracles.ORDER_CASES,
                         ids=[c[0] for c in oracles.ORDER_CASES])  # test_solvers' cases
def test_ode_solvers_converge_at_their_orders_on_ve(kind, options, steps, order):
  with jax.enable_x64(True):
    p = _ve()
    den = ct.make_denoiser(p, _gaussian_denoise_fn(p), 'eps')
    seed = oracles.new_seed()
    x_t = SIGMA_MAX * jax.random.normal(jax.random.key(seed), (4, 8), jnp.float64)
    ref = oracles.exact_map(p, x_t, 1.0, p.t_min, MU, S)
    run = jax.jit(functools.partial(sv.solve, kind, den, **options))
    errs = []
    for n in steps:
      out = run(x_t, sv.step_schedule(p, n, 'karras'))
      errs.append(float(jnp.max(jnp.abs(out.x_end - ref)) / jnp.max(jnp.abs(ref))))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f've {kind}: order {slope:.2f} over steps {steps}, relative errors '
          + ', '.join(f'{e:.2e}' for e in errs) + f' (seed {seed})')
    assert abs(slope - order) < 0.35, (kind, slope, errs, seed)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve', 'subvp'])
def test_adaptive_ode_follows_the_exact_map(name):
  seed = oracles.new_seed()
  p = PROCESSES[name]()
  den = ct.make_denoiser(p, _gaussian_denoise_fn(p), 'eps')
  x_t = p.prior_sample(jax.random.key(seed), (4, 8))
  ref = oracles.exact_map(p, x_t, 1.0, p.t_min, MU, S)
  out = jax.jit(functools.partial(sv.solve, 'ode', den, rtol=1e-6, atol=1e-6))(
      x_t, sv.step_schedule(p, 1))
  rel = float(jnp.max(jnp.abs(out.x_end - ref)) / jnp.max(jnp.abs(ref)))
  print(f'{name} adaptive ode: relative error {rel:.2e}, {int(out.nfe)} evaluations (seed {seed})')
  assert rel < 1e-3, seed


# The recovery tests' data: with μ = 1 the mean's standard error over 65,536 values is 0.2% of
# μ (the 1% tolerance is 5 standard errors) and the std's 0.28% (2% is 7): eight times fewer
# samples than μ = 0.3 would need for the same margins.
MU_R, S_R, SHAPE_R = 1.0, 0.5, (4096, 16)


def _check_moments(x, what, seed, std_rel=0.02):
  mean, std = float(jnp.mean(x)), float(jnp.std(x))
  print(f'{what}: mean {mean:.4f} ({mean / MU_R - 1:+.2%}), std {std:.4f} '
        f'({std / S_R - 1:+.2%}) (seed {seed})')
  assert std == pytest.approx(S_R, rel=std_rel), (what, seed)
  assert mean == pytest.approx(MU_R, rel=0.01), (what, seed)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve', 'subvp'])
@pytest.mark.parametrize('kind', ['sde', 'pc'])
def test_sde_and_pc_recover_the_gaussian(name, kind):
  """From the process's own prior, 1000 steps (log-SNR spaced: geometric in σ for VE)."""
  seed = oracles.new_seed()
  p = PROCESSES[name]()
  den = ct.make_denoiser(p, _gaussian_denoise_fn(p, mu=MU_R, s=S_R), 'eps')
  k_x, k_run = jax.random.split(jax.random.key(seed))
  x_t = p.prior_sample(k_x, SHAPE_R)
  out = jax.jit(functools.partial(sv.solve, kind, den))(x_t, sv.step_schedule(p, 1000), k_run)
  # PC's Langevin corrector at snr 0.16 leaves a known +1.25% in the std (a float64
  # re-derivation on this data): 2% would be only 2.7 standard errors beyond it.
  _check_moments(out.x0, f'{name} {kind}, 1000 steps', seed,
                 std_rel=0.025 if kind == 'pc' else 0.02)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve', 'subvp'])
@pytest.mark.parametrize('kind', ['ddpm', 'ddim'])
def test_ddpm_and_ddim_recover_the_gaussian(name, kind):
  """The discrete chains on a process without T (ddpm on VE: score_sde's ancestral sampler):
  1000 levels of the sampler's schedule there (log-SNR), from the exact marginal at t = 1
  (the prior N(0, σ_max²) would leave DDIM, a deterministic map, off by −μ·√(v(t_min)/v(1)),
  −5% of μ on VE)."""
  seed = oracles.new_seed()
  p = PROCESSES[name]()
  den = ct.make_denoiser(p, _gaussian_denoise_fn(p, mu=MU_R, s=S_R), 'eps')
  k_x, k_run = jax.random.split(jax.random.key(seed))
  a1, s1 = float(p.alpha(1.0)), float(p.sigma(1.0))
  x_t = a1 * MU_R + math.hypot(a1 * S_R, s1) * jax.random.normal(k_x, SHAPE_R)
  sampler = sampler_config.SamplerConfig(kind, steps=1000, clip_denoised=False)
  sched = sampler_lib.schedule_of(sampler, p)  # concrete: the chains' coefficients on the host
  np.testing.assert_allclose(sched.t, sv.step_schedule(p, 999, 'logsnr').t, rtol=1e-6)
  out = jax.jit(lambda x, k: sv.solve(kind, den, x, sched, k))(x_t, k_run)
  assert int(out.nfe) == sampler.num_evaluations(1000) == 1000
  _check_moments(out.x0, f'{name} {kind}, 1000 levels', seed)


def test_ddim_on_ve_is_euler_in_sigma():
  # α = 1: DDIM's x_s = x̂₀ + σ_s ε̂ is Euler's x + (σ_s − σ_t) ε̂, step for step.
  seed = oracles.new_seed()
  p = _ve()
  den = ct.make_denoiser(p, _gaussian_denoise_fn(p), 'eps')
  x_t = p.prior_sample(jax.random.key(seed), (64, 3))
  for kind in ('logsnr', 'karras'):
    sched = sv.step_schedule(p, 8, kind)
    np.testing.assert_allclose(sv.solve('ddim', den, x_t, sched).x0,
                               sv.solve('euler', den, x_t, sched).x0, rtol=1e-5, atol=1e-5,
                               err_msg=f'{kind}, seed {seed}')


@pytest.mark.slow
def test_annealed_langevin_recovers_the_gaussian():
  """NCSN's sampler: 50 geometric levels from σ_max to σ_min, 100 steps each, ε = 2e-5,
  then Tweedie's denoising step."""
  seed = oracles.new_seed()
  p = _ve()
  den = ct.make_denoiser(p, _gaussian_denoise_fn(p, mu=MU_R, s=S_R), 'eps')
  k_x, k_run = jax.random.split(jax.random.key(seed))
  x_t = p.prior_sample(k_x, SHAPE_R)
  sched = sv.step_schedule(p, 49)
  run = jax.jit(functools.partial(sv.solve, 'ald', den, steps_per_level=100, step_size=2e-5))
  out = run(x_t, sched, k_run)
  assert int(out.nfe) == sv.num_evaluations('ald', 49, steps_per_level=100) == 50 * 100 + 1
  _check_moments(out.x0, 'ald, 50 levels x 100 steps', seed)
  # Without the final denoising the samples are of N(μ, s² + σ_min²).
  assert float(jnp.std(out.x_end)) == pytest.approx(math.hypot(S_R, SIGMA_MIN), rel=0.02), seed


@pytest.mark.slow
@pytest.mark.parametrize('mean_type', ['xstart', 'score', 'v'])
def test_parameterisations_give_the_same_samples_on_ve(mean_type):
  seed = oracles.new_seed()
  p = _ve()
  x_t = p.prior_sample(jax.random.key(seed), (3, 2, 2, 2))
  sched = sv.step_schedule(p, 6)
  ref = sv.solve('heun', ct.make_denoiser(p, _gaussian_denoise_fn(p, 'eps'), 'eps'), x_t, sched)
  got = sv.solve('heun', ct.make_denoiser(p, _gaussian_denoise_fn(p, mean_type), mean_type),
                 x_t, sched)
  np.testing.assert_allclose(got.x0, ref.x0, rtol=2e-4, atol=2e-4, err_msg=f'seed {seed}')


# ------------------------------------------------------------------------------------------
# The PF-ODE likelihood on correlated N(μ, Σ), D = 4 (tests/oracles.py).
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve', 'subvp', 'flow'])   # flow: tests/test_flow.py's too
def test_pf_ode_likelihood_matches_the_analytic_density(name):
  seed = oracles.new_seed()
  p = PROCESSES[name]()
  den = ct.make_denoiser(p, helpers.correlated_denoise_fn(p), 'eps')
  exact_prior = oracles.gaussian_log_density(*oracles.correlated_marginal(p, p.t_max))
  mean0, cov0 = oracles.correlated_marginal(p, p.t_min)
  x = np.random.default_rng(seed).multivariate_normal(mean0, cov0, size=8)
  fn = jax.jit(functools.partial(ol.ode_log_likelihood, p, den, exact_trace=True,
                                 prior_logp=exact_prior, rtol=1e-6, atol=1e-6))
  logp, _, nfe = fn(jnp.asarray(x, jnp.float32), None)
  want = stats.multivariate_normal(mean0, cov0).logpdf(x)
  rel = np.max(np.abs(np.asarray(logp) - want) / np.abs(want))
  print(f'{name}: exact-trace PF-ODE log p, max relative error {rel:.2e} ({int(nfe)} '
        f'evaluations; seed {seed})')
  assert rel < 1e-3, seed
  # The default prior is the process's own (N(0, σ_max² I) for VE), off by the small
  # difference of N(0, σ_max² I) from N(μ, Σ + σ_max² I) at t = 1 (a few hundredths of a nat;
  # N(0, I) in its place would be off by ‖x₁‖²/2, about 200 nats for VE).
  logp_default, _, _ = jax.jit(functools.partial(
      ol.ode_log_likelihood, p, den, exact_trace=True, rtol=1e-6, atol=1e-6))(
          jnp.asarray(x, jnp.float32), None)
  assert np.max(np.abs(np.asarray(logp_default) - want)) < 0.5, seed


# ------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors():
  for lo, hi in ((10.0, 1.0), (1.0, 1.0), (0.0, 1.0)):
    with pytest.raises(ValueError) as e:
      ct.VEProcess(sigma_min=lo, sigma_max=hi)
    oracles.assert_one_line_error(e.value, 'sigma_min')
  with pytest.raises(ValueError) as e:
    ct.SubVPProcess(beta_min=20.0, beta_max=0.1)
  oracles.assert_one_line_error(e.value, 'beta_min')
  with pytest.raises(ValueError) as e:
    ct.make_process('dsm')
  oracles.assert_one_line_error(e.value, 'diffusion.process')
  # ALD on a VP process.
  from diffusion_jax.process import gaussian_diffusion as gd
  vp = helpers.linear_vp_process(10)
  den = lambda x, t: (x, x)
  with pytest.raises(ValueError) as e:
    sv.solve('ald', den, jnp.zeros((2, 3)), sv.step_schedule(vp, 4), jax.random.key(0))
  oracles.assert_one_line_error(e.value, "'ald'", "'vp'")
  with pytest.raises(ValueError) as e:
    sv.solve('ald', den, jnp.zeros((2, 3)), sv.step_schedule(_ve(), 4), jax.random.key(0),
             steps_per_level=0)
  oracles.assert_one_line_error(e.value, 'steps_per_level')
  # Continuous processes take any number of steps, but at least one.
  assert sv.step_schedule(_ve(), 5000).num_steps == 5000
  with pytest.raises(ValueError) as e:
    sv.step_schedule(_subvp(), 0)
  oracles.assert_one_line_error(e.value, 'steps')
  # A discrete-time DDPM chain refuses the score parameterisation.
  d = gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, 10))
  with pytest.raises(ValueError) as e:
    gd.training_losses(d, lambda x, t: x, jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32),
                       jnp.zeros((2, 4)), loss_type='mse', mean_type='score',
                       var_type='fixedlarge')
  oracles.assert_one_line_error(e.value, 'score')
