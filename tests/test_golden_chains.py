"""The solvers `ddpm` and `ddim` against the discrete chains they replaced, kept frozen in
tests/golden_chains.py (the old `samplers.py` over a respaced `GaussianDiffusion`).

The model is a fixed nonlinear function of (x, timestep) whose output depends on the exact
timestep it is fed, with a variance output for the learned variances, so a level placed off
DDPM's integer timesteps, a wrong coefficient, a wrong key or a dropped option all show. The
same seed must give the same samples to float32 rounding. Where a combination cannot be exact,
the test says why and checks what it can.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from diffusion_jax.process import continuous
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import respacing
from diffusion_jax.process import schedules
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers
from diffusion_jax.sampling.config import SamplerConfig

try:
  from tests import golden_chains as golden
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import golden_chains as golden

T = 40
SHAPE = (6, 4, 4, 2)
# Agreement to float32 rounding. The golden chains take their coefficients from float64
# arrays rounded once to float32, the solvers from float64 on the host through the float32
# log ᾱ of the process: a few ulps per step. Unclipped deterministic DDIM amplifies them most,
# by 1/α at the noisiest level (x̂₀ = (x − σε̂)/α, α ≈ 0.03 here). Measured on one seed,
# worst first: ddim unclipped 40 levels 9.5e-6 (η = 0.5), 7.2e-6 (η = 0); ddim clipped 9
# levels 8.9e-7; ddpm 40 levels 6.3e-7 (fixedlarge), 4.8e-7 (fixedsmall); ddpm 7 levels
# 3.6e-7. The faults these tests exist for (η ignored, a β from the wrong pair, a level off
# DDPM's timesteps, a key out of order) move samples by 1e-2 or more.
ATOL = 5e-5


def _diffusion():
  return gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', num_timesteps=T,
                                                                      beta_start=1e-3,
                                                                      beta_end=0.2))


def _model(seed: int, channels: int, learned: str | None = None):
  """`denoise_fn(x [B, H, W, C], timesteps [B]) -> [B, H, W, C or 2C]`, smooth in both."""
  k = jax.random.split(jax.random.key(seed), 4)
  a = 0.8 + 0.4 * jax.random.uniform(k[0], SHAPE[1:])
  freqs = jnp.asarray([0.05, 0.31, 1.7])       # the integer timestep shows in sin(1.7 t)
  proj = jax.random.normal(k[1], (3, channels))
  var_proj = jax.random.normal(k[2], (3, channels))

  def denoise_fn(x, t):
    emb = jnp.sin(jnp.asarray(t, jnp.float32)[:, None] * freqs)   # [B, 3]
    mean = jnp.tanh(a * x + (emb @ proj)[:, None, None, :])
    if learned is None:
      return mean
    v = jnp.tanh(0.5 * x + (emb @ var_proj)[:, None, None, :])     # in (-1, 1)
    if learned == 'learned':
      v = -4.0 + 2.0 * v                                           # a log-variance
    return jnp.concatenate([mean, v], axis=-1)
  return denoise_fn


def _new(d, denoise_fn, rng, *, kind, steps, mean_type, var_type='fixedsmall', clip=True,
         eta=0.0, x_init=None, record=None):
  cfg = SamplerConfig(kind, steps=steps, clip_denoised=clip, **({'eta': eta} if eta else {}))
  fn = jax.jit(lambda r, xi: sampler_lib.sample(
      denoise_fn, continuous.VPProcess.from_diffusion(d), SHAPE, r, sampler=cfg,
      parameterization=gd.Parameterization(mean_type, var_type), x_init=xi, record=record))
  x0, nfe = fn(rng, x_init)
  return np.asarray(x0), int(nfe)


def _respaced(d, steps):
  return golden.respace(d, golden.space_timesteps(T, steps)) if steps != T else d


@pytest.fixture
def rng(request):
  seed = abs(hash(request.node.name)) % 2**31
  print(f'seed {seed}')
  return jax.random.key(seed)


# ------------------------------------------------------------------------------------------
# The coefficients, pair by pair, against the respaced process's own (float64).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('steps', [T, 9, 2])
def test_pair_coefficients_are_the_respaced_posterior(steps):
  d = _diffusion()
  r = golden.respace(d, golden.space_timesteps(T, steps))
  sched = solvers.level_schedule(continuous.VPProcess.from_diffusion(d), steps)
  c = solvers.pair_coefficients(sched)
  # Level j of the schedule is index K−1−j of the respaced process; pair j leaves it.
  idx = np.arange(steps - 1, 0, -1)
  betas = np.asarray(r.betas, np.float64)[idx]
  ab = np.cumprod(1.0 - np.asarray(r.betas, np.float64))
  ab_t, ab_s = ab[idx], ab[idx - 1]
  post_var = betas * (1.0 - ab_s) / (1.0 - ab_t)
  np.testing.assert_allclose(c.x0, betas * np.sqrt(ab_s) / (1.0 - ab_t), rtol=2e-6)
  np.testing.assert_allclose(c.x, (1.0 - ab_s) * np.sqrt(1.0 - betas) / (1.0 - ab_t), rtol=2e-6)
  np.testing.assert_allclose(c.small, post_var, rtol=2e-6)
  np.testing.assert_allclose(c.large, betas, rtol=2e-6)
  # And the golden process's arrays (float32) at those indices, to their rounding.
  np.testing.assert_allclose(c.small, np.asarray(r.posterior_variance)[idx], rtol=1e-5)
  np.testing.assert_allclose(np.log(c.small), np.asarray(r.posterior_log_variance_clipped)[idx],
                             rtol=1e-5)
  # The model sees DDPM's integer timesteps at the levels.
  ts = np.asarray(sched.process.model_timestep(sched.t))
  np.testing.assert_array_equal(ts, np.asarray(r.timestep_map)[::-1].astype(np.float32))


@pytest.mark.parametrize('big_t', [1000, 4000])
def test_the_model_sees_ddpms_integer_timesteps_at_every_level(big_t):
  """T·t_n − 1 in float32 misses n at some levels (10 of 1,000, by up to 3e-5; 44 of 4,000):
  at a level the model must be fed n itself, as the discrete chains always did."""
  betas = schedules.get_beta_schedule('linear', num_timesteps=big_t)
  process = continuous.VPProcess.from_diffusion(gd.GaussianDiffusion.from_betas(betas))
  sched = solvers.level_schedule(process, big_t)
  ts = np.asarray(process.model_timestep(sched.t))
  np.testing.assert_array_equal(ts, np.arange(big_t - 1, -1, -1, dtype=np.float32))


# ------------------------------------------------------------------------------------------
# Whole chains, same seed.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('var_type', ['fixedsmall', 'fixedlarge', 'learned', 'learned_range'])
@pytest.mark.parametrize('steps', [T, 7])
def test_ddpm_equals_the_ancestral_chain(rng, var_type, steps):
  d = _diffusion()
  learned = var_type if var_type.startswith('learned') else None
  fn = _model(1, SHAPE[-1], learned)
  want = golden.p_sample_loop(_respaced(d, steps), fn, SHAPE, rng, mean_type='eps',
                              var_type=var_type)
  got, nfe = _new(d, fn, rng, kind='ddpm', steps=steps, mean_type='eps', var_type=var_type)
  assert nfe == steps
  np.testing.assert_allclose(got, np.asarray(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize('mean_type,clip', [('xstart', True), ('v', False), ('eps', False)])
def test_ddpm_equals_the_ancestral_chain_for_each_output(rng, mean_type, clip):
  d = _diffusion()
  fn = _model(2, SHAPE[-1])
  want = golden.p_sample_loop(_respaced(d, 11), fn, SHAPE, rng, mean_type=mean_type,
                              var_type='fixedlarge', clip_denoised=clip)
  got, _ = _new(d, fn, rng, kind='ddpm', steps=11, mean_type=mean_type, var_type='fixedlarge',
                clip=clip)
  np.testing.assert_allclose(got, np.asarray(want), atol=ATOL, rtol=0)


def test_ddpm_of_an_xprev_model_equals_the_full_chain_without_clipping(rng):
  """Exact for all T steps with clip_denoised=False. Not exact otherwise, by design:
  - Ho's chain uses an xprev model's mean unclipped even when clipping x̂₀ (the clip changes
    only what it reports), while the solver clips x̂₀ and steps from it, like every output;
  - respaced, the old chain used the one-step mean μ̃(x_τ, τ → τ−1) as the step to the next
    kept level, which is wrong; the solver turns it into x̂₀ and takes the posterior step of
    the pair, so the two differ."""
  d = _diffusion()
  fn = _model(3, SHAPE[-1])
  want = golden.p_sample_loop(d, fn, SHAPE, rng, mean_type='xprev', var_type='fixedsmall',
                              clip_denoised=False)
  got, _ = _new(d, fn, rng, kind='ddpm', steps=T, mean_type='xprev', clip=False)
  np.testing.assert_allclose(got, np.asarray(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('steps,clip', [(T, False), (9, True), (1, True)])
def test_ddim_equals_the_ddim_chain(rng, eta, steps, clip):
  d = _diffusion()
  fn = _model(4, SHAPE[-1])
  want = golden.ddim_sample_loop(d, fn, SHAPE, rng, num_steps=steps, eta=eta,
                                 mean_type='eps', clip_denoised=clip)
  got, nfe = _new(d, fn, rng, kind='ddim', steps=steps, mean_type='eps', clip=clip, eta=eta)
  assert nfe == steps
  np.testing.assert_allclose(got, np.asarray(want), atol=ATOL, rtol=0)


def test_ddim_of_a_learned_variance_model_ignores_the_variance(rng):
  d = _diffusion()
  fn = _model(5, SHAPE[-1], 'learned_range')
  want = golden.ddim_sample_loop(d, fn, SHAPE, rng, num_steps=13, eta=0.3, mean_type='v')
  got, _ = _new(d, fn, rng, kind='ddim', steps=13, mean_type='v', var_type='learned_range',
                eta=0.3)
  np.testing.assert_allclose(got, np.asarray(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize('steps', [T, 8])
def test_ddim_encoder_and_decoder_equal_the_old_ones(rng, steps):
  d = _diffusion()
  fn = _model(6, SHAPE[-1])
  x0 = jnp.clip(0.5 * jax.random.normal(rng, SHAPE), -1.0, 1.0)
  want = golden.ddim_reverse_sample_loop(d, fn, x0, num_steps=steps, mean_type='eps')
  cfg = SamplerConfig('ddim', steps=steps)
  param = gd.Parameterization('eps', 'fixedsmall')
  process = continuous.VPProcess.from_diffusion(d)
  got = jax.jit(lambda x: sampler_lib.encode(fn, process, x, sampler=cfg,
                                             parameterization=param))(x0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)
  back_want = golden.ddim_sample_loop(d, fn, SHAPE, rng, num_steps=steps, mean_type='eps',
                                      x_init=want)
  back, _ = _new(d, fn, rng, kind='ddim', steps=steps, mean_type='eps', x_init=got)
  np.testing.assert_allclose(back, np.asarray(back_want), atol=ATOL, rtol=0)


def test_the_trajectory_callback_sees_the_progressive_chain(rng):
  """`record` gets every evaluation: (t, x_t, x̂₀) at each level, as the old progressive
  chain saved them (x_t fed to the model at each timestep and the x̂₀ it predicted)."""
  d = _diffusion()
  steps = 10
  r = _respaced(d, steps)
  fn = _model(7, SHAPE[-1])
  _, chain, preds = golden.p_sample_loop_progressive(
      r, fn, SHAPE, rng, mean_type='eps', var_type='fixedsmall',
      save_timesteps=list(range(steps)))                     # chain[k]: respaced index k
  seen = []
  _new(d, fn, rng, kind='ddpm', steps=steps, mean_type='eps',
       record=lambda t, x, x0: seen.append((np.asarray(t)[0], np.asarray(x), np.asarray(x0))))
  jax.effects_barrier()
  assert len(seen) == steps                                   # N steps + the final x̂₀
  process = continuous.VPProcess.from_diffusion(d)
  for j, (t, x, x0) in enumerate(seen):
    k = steps - 1 - j
    assert float(process.model_timestep(jnp.asarray(t))) == int(np.asarray(r.timestep_map)[k])
    np.testing.assert_allclose(x, np.asarray(chain[k]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(x0, np.asarray(preds[k]), atol=ATOL, rtol=0)


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(rng):
  d = _diffusion()
  fn = _model(8, SHAPE[-1])
  a, _ = _new(d, fn, rng, kind='ddpm', steps=12, mean_type='eps')
  b, _ = _new(d, fn, rng, kind='ddpm', steps=12, mean_type='eps')
  c, _ = _new(d, fn, jax.random.fold_in(rng, 1), kind='ddpm', steps=12, mean_type='eps')
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(a - c)) > 0.1


# ------------------------------------------------------------------------------------------
# Beyond VP: ddpm and ddim on the VE and sub-VP processes.
# ------------------------------------------------------------------------------------------


def test_ddpm_on_ve_is_score_sdes_ancestral_predictor(rng):
  """For VE, one ddpm step from σ_t to σ_s is score_sde's ancestral predictor:
  x_s = x + (σ_t² − σ_s²) s(x) + √(σ_s²(σ_t² − σ_s²)/σ_t²) z, with s = −ε̂/σ_t."""
  process = continuous.VEProcess(sigma_min=0.01, sigma_max=10.0)
  sched = solvers.schedule_from_times(process, jnp.asarray([0.8, 0.55]))
  x = 3.0 * jax.random.normal(rng, SHAPE)
  eps_fn = lambda x, t: (jnp.tanh(x) + 0.1 * t[:, None, None, None], None)
  denoiser = lambda x, t: (x - process.sigma(t)[:, None, None, None] * eps_fn(x, t)[0],
                           eps_fn(x, t)[0])
  key = jax.random.fold_in(rng, 7)
  got = solvers.ddpm(denoiser, x, sched, key)
  st, ss = (float(process.sigma(jnp.asarray(v))) for v in (0.8, 0.55))
  score = -eps_fn(x, jnp.full((SHAPE[0],), 0.8))[0] / st
  z = jax.random.normal(jax.random.fold_in(key, 1), SHAPE)     # step 0 of N = 1: key N − 0
  want = x + (st**2 - ss**2) * score + np.sqrt(ss**2 * (st**2 - ss**2) / st**2) * z
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
