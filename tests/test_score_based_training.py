"""The score-based family in training, the spec and sampling: the objectives as the train step
computes them (against closed forms on Gaussian data), a short VE run that learns, and the
one-line errors of pairings that have no meaning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits, digits_ncsn, tiny
from diffusion_jax.process import continuous as ct
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers
from diffusion_jax import spec as spec_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.spec import OptimizerConfig
from diffusion_jax.training.state import TrainState

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

DIGITS = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500, 'test': 297})
MU, S = 0.3, 0.5   # the data: x₀ ~ N(MU, S²) per coordinate (as in test_score_based)


def _ncsn_spec(**diffusion):
  config = digits_ncsn.get_config()
  for k, v in diffusion.items():
    setattr(config.diffusion, k, v)
  return spec_lib.ExperimentSpec.from_config(config, DIGITS)


# ------------------------------------------------------------------------------------------
# The objectives as the step computes them, at the exact score of Gaussian data.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ve', 'subvp', 'vp'])
def test_step_objectives_at_the_exact_score_match_their_closed_forms(name):
  """x₀ ~ N(μ, s²) per coordinate; x_t = αx₀ + σz has the marginal variance v = α²s² + σ².
  At the exact score −(x − αμ)/v, per coordinate (the step averages over pixels):
    dsm  σ²·½ E(s + z/σ)² = ½ σ²(1/σ² − 1/v) = ½ α²s²/v,
    ssm  σ² E[∂s/∂x + ½ s²] = σ²(−1/v + ½/v) = −½ σ²/v
  (the projections are Rademacher and ∂s/∂x is diagonal, so ssm's trace term is exact)."""
  rng, seed = oracles.new_rng()
  process = (helpers.linear_vp_process(1000) if name == 'vp' else
             {'ve': ct.VEProcess(sigma_min=0.01, sigma_max=10.0), 'subvp': ct.SubVPProcess()}[name])
  b = 4096
  t = jnp.asarray(rng.uniform(process.t_min, process.t_max, b), jnp.float32)
  x0 = jnp.asarray(MU + S * rng.standard_normal((b, 4, 4, 1)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((b, 4, 4, 1)), jnp.float32)
  denoise = helpers.gaussian_denoise_fn(process, MU, S)
  a = np.asarray(process.alpha(t), np.float64)
  sg = np.asarray(process.sigma(t), np.float64)
  v = a ** 2 * S ** 2 + sg ** 2
  expected = {spec_lib.Objective.DSM: 0.5 * a ** 2 * S ** 2 / v,
              spec_lib.Objective.SSM: -0.5 * sg ** 2 / v}
  for objective, want in expected.items():
    terms = jax.jit(functools.partial(step_lib.score_matching_terms, process, denoise, 'eps',
                                      objective=objective))(x0, t, z, jax.random.key(seed))
    diff = np.asarray(terms['loss'], np.float64) - want           # [b]
    se = diff.std(ddof=1) / np.sqrt(b)
    assert abs(diff.mean()) < 5 * se + 1e-4, (name, objective, diff.mean(), se, seed)
  # A score 10% too large: per example the dsm loss rises by exactly
  # ½·mean[(1.1ε̂ − z)² − (ε̂ − z)²], ε̂ = σ(x − αμ)/v the exact noise prediction (re-derived
  # here in float64); on average by ½·σ²·0.01/v per coordinate. The mean is checked within 5
  # standard errors: the per-example gap's spread is ten times its mean, so a fixed relative
  # tolerance would be a coin toss.
  scaled = lambda x, n: 1.1 * denoise(x, n)
  worse = step_lib.score_matching_terms(process, scaled, 'eps', x0, t, z, jax.random.key(0),
                                        spec_lib.Objective.DSM)['loss']
  best = step_lib.score_matching_terms(process, denoise, 'eps', x0, t, z, jax.random.key(0),
                                       spec_lib.Objective.DSM)['loss']
  gap = np.asarray(worse, np.float64) - np.asarray(best, np.float64)   # [b]
  a4, s4 = a[:, None, None, None], sg[:, None, None, None]
  x = a4 * np.asarray(x0, np.float64) + s4 * np.asarray(z, np.float64)
  eps_hat = s4 * (x - a4 * MU) / (a4 ** 2 * S ** 2 + s4 ** 2)
  zz = np.asarray(z, np.float64)
  exact = 0.5 * ((1.1 * eps_hat - zz) ** 2 - (eps_hat - zz) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(gap, exact, atol=2e-5, err_msg=f'seed {seed}')
  mean_gap = np.mean(0.5 * sg ** 2 * 0.01 / v)
  se = gap.std(ddof=1) / np.sqrt(b)
  assert abs(gap.mean() - mean_gap) < 5 * se, (name, gap.mean(), mean_gap, se, seed)


@pytest.mark.slow
def test_continuous_timesteps_are_uniform_on_the_process_interval():
  """t ~ U(t_min, t_max) per example, float32, as a function of the example's index only."""
  _, seed = oracles.new_rng()
  cfg = step_lib.StepConfig(objective='dsm', process=ct.SubVPProcess())
  idx = jnp.arange(20000)
  t, w, noise, _ = step_lib._per_example_randomness(  # pylint: disable=protected-access
      jax.random.key(seed), None, idx, (20000, 2, 2, 1), None, cfg)
  assert t.dtype == jnp.float32
  t = np.asarray(t, np.float64)
  assert np.all(np.asarray(w) == 1) and noise.shape == (20000, 2, 2, 1)
  lo, hi = 1e-3, 1.0
  assert lo <= t.min() and t.max() <= hi
  se = (hi - lo) / np.sqrt(12 * t.size)
  assert abs(t.mean() - (lo + hi) / 2) < 4 * se, (t.mean(), seed)
  # The whole distribution, not its centre only (any symmetric law on the interval has that
  # mean): the Kolmogorov–Smirnov distance to the uniform CDF, against the Dvoretzky–Kiefer–
  # Wolfowitz–Massart bound P(D > ε) ≤ 2·exp(−2nε²) at a false-alarm probability of 1e-6
  # (ε ≈ 0.019 here; the mean of two uniforms, triangular, is at 0.125).
  n = t.size
  u = np.sort((t - lo) / (hi - lo))
  ranks = np.arange(1, n + 1) / n
  distance = max(np.max(ranks - u), np.max(u - (ranks - 1.0 / n)))
  epsilon = np.sqrt(np.log(2.0 / 1e-6) / (2.0 * n))
  assert distance < epsilon, (distance, epsilon, seed)
  t5, *_ = step_lib._per_example_randomness(  # pylint: disable=protected-access
      jax.random.key(seed), None, idx[5:6], (1, 2, 2, 1), None, cfg)
  assert float(t5[0]) == pytest.approx(t[5], abs=0)


# ------------------------------------------------------------------------------------------
# A short VE run learns.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_ve_dsm_run_lowers_the_heldout_loss():
  """Fault: the gradient's sign flipped (or the score's). 60 Adam steps of the tiny U-Net on
  the training digits under the NCSN spec (VE, dsm): the held-out dsm loss of the params at
  fixed t and z falls by more than 10 standard errors and by a fifth."""
  rng, seed = oracles.new_rng()
  config = digits_ncsn.get_config()
  config.model.ch_mult, config.model.attn_resolutions = (1, 2), (4,)
  spec = spec_lib.ExperimentSpec.from_config(config, DIGITS)
  model = spec.model.make()
  opt = OptimizerConfig(learning_rate=2e-3, warmup_steps=10, grad_clip=1.0)
  tx = opt.make()
  cfg = step_lib.StepConfig.from_spec(spec)
  assert cfg.process.kind is ct.ProcessKind.VE and cfg.objective is spec_lib.Objective.DSM
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=spec.diffusion.make(),
                              tx=tx, learning_rate_fn=opt.learning_rate_schedule(), cfg=cfg)
  update = step_lib.data_parallel_step(step_fn, helpers.mesh(8))
  params0 = spec.init_params(jax.random.PRNGKey(1))
  state = TrainState.create(params0, tx, jax.random.PRNGKey(seed))
  params0 = jax.tree.map(np.array, params0)

  def heldout(params, x, t, z):
    denoise = lambda x_in, n: model.apply({'params': params}, x_in, n, train=False)
    return np.asarray(step_lib.score_matching_terms(
        cfg.process, denoise, 'eps', x, t, z, jax.random.key(0), spec_lib.Objective.DSM)['loss'])

  x_train = helpers.digits('train')[0].astype(np.float32) / 127.5 - 1.0
  for _ in range(60):
    idx = rng.integers(0, len(x_train), 64)
    state, metrics = update(state, dict(image=jnp.asarray(x_train[idx]),
                                        label=jnp.zeros((64,), jnp.int32)))
    assert np.isfinite(float(metrics['loss']))
  x_test = np.resize(helpers.digits('test')[0], (256, 8, 8, 1))
  x = jnp.asarray(x_test.astype(np.float32) / 127.5 - 1)
  t = jnp.asarray(rng.uniform(0, 1, 256), jnp.float32)
  z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  before, after = heldout(params0, x, t, z), heldout(state.params, x, t, z)
  diff = before - after
  se = diff.std(ddof=1) / np.sqrt(len(diff))
  print('held-out dsm loss', before.mean(), '->', after.mean(), 'se', se, 'seed', seed)
  assert diff.mean() > 10 * se and after.mean() < 0.8 * before.mean()


# ------------------------------------------------------------------------------------------
# The spec: fields, resume, and pairings without meaning.
# ------------------------------------------------------------------------------------------


def test_digits_ncsn_spec():
  spec = _ncsn_spec()
  d = spec.diffusion
  assert (d.process, d.objective) == (ct.ProcessKind.VE, spec_lib.Objective.DSM)
  p = d.make_process()
  assert isinstance(p, ct.VEProcess) and (p.sigma_min, p.sigma_max) == (0.01, 10.0)
  # The U-Net's Fourier features take log σ itself.
  assert (spec.model.time_embedding, spec.model.time_scale) == ('fourier', 1.0)
  back = spec_lib.ExperimentSpec.from_json(spec.to_json())
  assert back == spec
  # The DDPM recipe is unchanged: vp, ddpm, T as the time scale.
  old = spec_lib.ExperimentSpec.from_config(digits.get_config(), DIGITS)
  assert (old.diffusion.process.value, old.diffusion.objective.value) == ('vp', 'ddpm')
  assert old.model.time_scale == 1000.0


def test_process_and_objective_are_fixed_on_resume_and_absent_reads_as_ddpm():
  old = spec_lib.ExperimentSpec.from_config(tiny.get_config(), DIGITS)
  stored = old.to_json()
  for k in ('process', 'objective', 'sigma_min', 'sigma_max'):
    del stored['diffusion'][k]     # a spec.json written before the fields existed
  assert spec_lib.differences(stored, old) == ([], [])
  assert spec_lib.ExperimentSpec.from_json(stored) == old
  for field, value in (('objective', 'dsm'), ('process', 'subvp')):
    config = tiny.get_config()
    config.diffusion.objective = 'dsm'
    setattr(config.diffusion, field, value)
    fixed, _ = spec_lib.differences(stored, spec_lib.ExperimentSpec.from_config(config, DIGITS))
    assert f'diffusion.{field}' in [name for name, _, _ in fixed], fixed


@pytest.mark.parametrize('change, fragments', [
    (dict(sigma_min=10.0, sigma_max=1.0), ('sigma_min', 'sigma_max', '10.0')),
    (dict(sigma_min=1.0, sigma_max=1.0), ('sigma_min', 'sigma_max')),
    (dict(objective='ddpm'), ("'ddpm'", "'vp'", "'ve'")),
    (dict(objective='ism'), ("'ism'", 'diffusion.objective', "'dsm'")),
    (dict(process='vpx'), ("'vpx'", 'diffusion.process')),
    (dict(var_type='learned_range'), ("'learned_range'", "'dsm'")),
    (dict(loss_type='hybrid'), ("'hybrid'", "'mse'")),
    (dict(mean_type='xprev'), ("'xprev'", "'dsm'")),
])
def test_bad_score_based_specs_are_one_line_errors(change, fragments):
  with pytest.raises(ValueError) as e:
    _ncsn_spec(**change)
  oracles.assert_one_line_error(e.value, *fragments)


def test_samplers_without_meaning_for_the_process_are_one_line_errors():
  # ald on a vp model, in the config...
  config = digits.get_config()
  config.eval.sampler = 'ald'
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, DIGITS)
  oracles.assert_one_line_error(e.value, "'ald'", "'vp'")
  # ...and on a sub-VP model: NCSN's sampler needs a process that does not scale x₀ (ve).
  with pytest.raises(ValueError) as e:
    _ncsn_spec(process='subvp').diffusion.check_sampler(
        sampler_config.SamplerConfig('ald', steps=10))
  oracles.assert_one_line_error(e.value, "'ald'", "defined for the ve", "only, not 'subvp'")
  # The discrete chains run on a ve model (on log-SNR levels: it has no T)...
  config = digits_ncsn.get_config()
  config.training.sampler, config.eval.sampler = 'ddpm', 'ddim'
  spec = spec_lib.ExperimentSpec.from_config(config, DIGITS)
  assert (spec.run.sampler.kind.value, spec.eval.sampler.kind.value) == ('ddpm', 'ddim')
  process = spec.diffusion.make_process()
  for kind in ('ddpm', 'ddim'):
    sampler = sampler_config.SamplerConfig(kind, steps=10)
    sampler_lib.sample_fn(spec.model.make(), spec.diffusion.make(),
                          parameterization=spec.parameterization, sampler=sampler,
                          process=process)
    np.testing.assert_allclose(sampler_lib.schedule_of(sampler, process).t,
                               solvers.step_schedule(process, 9, 'logsnr').t, rtol=1e-6)
  # ...but not on DDPM's integer timesteps, which a ve model has not.
  config.training.step_schedule = 'respaced'
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, DIGITS)
  oracles.assert_one_line_error(e.value, "step_schedule 'respaced'", "'vp'", "not 've'")


def test_sample_fn_refuses_respaced_steps_off_vp():
  # Only the default of ddpm and ddim falls back to log-SNR levels off VP: a 'respaced' that
  # the caller set is refused by sample_fn itself, as by the spec, not silently replaced.
  spec = _ncsn_spec()
  for kind in ('ddpm', 'ddim'):
    with pytest.raises(ValueError) as e:
      sampler_lib.sample_fn(spec.model.make(), spec.diffusion.make(),
                            parameterization=spec.parameterization,
                            sampler=sampler_config.SamplerConfig(kind, steps=10,
                                                                 step_schedule='respaced'),
                            process=spec.diffusion.make_process())
    oracles.assert_one_line_error(e.value, "step_schedule 'respaced'", "'vp'", "not 've'")
  spec.diffusion.check_sampler(sampler_config.SamplerConfig('ald', steps=10, langevin_steps=5))
  for bad in (dict(langevin_steps=0), dict(langevin_step_size=-1.0)):
    with pytest.raises(ValueError) as e:
      sampler_config.SamplerConfig('ald', **bad)
    oracles.assert_one_line_error(e.value, next(iter(bad)))
