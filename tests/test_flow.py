"""Flow matching and reflow (docs/flow.md): the 'flow' process x_t = (1 − t) x₀ + t ε against
float64 closed forms; the ideal velocity and the loss on Gaussian data x₀ ~ N(μ, s²); the
time densities; the PF-ODE likelihood; every solver on the flow; the spec's rules; reflow's
pairs, their stream, and a reflow run stopped while it makes them.

The ideal velocity of N(μ, s²) data: u*(x, t) = E[ε − x₀ | x_t = x] = μ_u + c (x − m_t) with
m_t = (1 − t)μ, v_t = (1 − t)²s² + t², c = Cov(ε − x₀, x_t)/v_t = (t − (1 − t)s²)/v_t and
μ_u = −μ; the loss at u* is the conditional variance 1 + s² − c² v_t per coordinate.
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.process import continuous as ct
from diffusion_jax.process import flow_matching as fm
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers as sv

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

MU, S = 0.3, 0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ideal_velocity(x, t, mu=MU, s=S):
  """float64 E[ε − x₀ | x_t = x] (module docstring)."""
  v = (1 - t) ** 2 * s ** 2 + t ** 2
  return -mu + (t - (1 - t) * s ** 2) / v * (x - (1 - t) * mu)


# ------------------------------------------------------------------------------------------
# The process.
# ------------------------------------------------------------------------------------------


def test_the_flow_process_matches_float64_closed_forms():
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    p = ct.FlowProcess()
    t = np.concatenate([rng.uniform(p.t_min, p.t_max, 200), [p.t_min, p.t_max]])
    a, sg = 1.0 - t, t
    lam = np.log(a) - np.log(sg)
    np.testing.assert_allclose(p.alpha(t), a, rtol=1e-12, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.sigma(t), sg, rtol=1e-12, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.lam(t), lam, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.t_of_lambda(jnp.asarray(lam)), t, rtol=1e-12)
    np.testing.assert_allclose(p.log_alpha_of_lambda(jnp.asarray(lam)), np.log(a), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(p.log_sigma_of_lambda(jnp.asarray(lam)), np.log(sg), rtol=1e-12,
                               atol=1e-12)
    # f = d log α/dt, g² = dσ²/dt − 2fσ² and d log σ/dλ by central differences.
    ti = rng.uniform(0.01, 0.99, 100)
    h = 1e-6
    dla = (np.log1p(-(ti + h)) - np.log1p(-(ti - h))) / (2 * h)
    np.testing.assert_allclose(p.f(ti), dla, rtol=1e-6, err_msg=f'seed {seed}')
    np.testing.assert_allclose(p.g2(ti), 2 * ti - 2 * dla * ti ** 2, rtol=1e-6)
    lam_of = lambda tt: np.log1p(-tt) - np.log(tt)
    dls = (np.log(ti + h) - np.log(ti - h)) / (lam_of(ti + h) - lam_of(ti - h))
    np.testing.assert_allclose(p.dlog_sigma_dlambda(jnp.asarray(lam_of(ti))), dls, rtol=1e-6)
    x0, noise = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(p.q_sample(jnp.asarray(x0), jnp.asarray(t[:6]), jnp.asarray(noise)),
                               (1 - t[:6])[:, None] * x0 + t[:6, None] * noise, rtol=1e-12)
    np.testing.assert_allclose(fm.interpolate(jnp.asarray(x0), jnp.asarray(noise),
                                              jnp.asarray(t[:6])),
                               (1 - t[:6])[:, None] * x0 + t[:6, None] * noise, rtol=1e-12)
    assert p.model_timestep(jnp.asarray(0.25)) == pytest.approx(250.0)
  with pytest.raises(ValueError) as e:
    ct.FlowProcess(t_min=0.5, t_max=0.1)
  oracles.assert_one_line_error(e.value, 't_min', 't_max')


def test_the_ideal_velocity_is_the_pf_ode_drift_and_the_flow_output():
  """The exact model read as 'flow' (ε − x₀) and as 'eps' give the same (x̂₀, ε̂), whose
  velocity ε̂ − x̂₀ is the float64 u*, and the PF-ODE's drift f x − ½g² s is u* too."""
  seed = oracles.new_seed()
  with jax.enable_x64(True):
    p = ct.FlowProcess()
    rng = np.random.default_rng(seed)
    t = rng.uniform(p.t_min, p.t_max, 64)
    x = rng.normal(size=(64, 5)) * 1.2
    want = _ideal_velocity(x, t[:, None])
    for mt in ('flow', 'eps', 'xstart', 'v', 'score'):
      den = ct.make_denoiser(p, helpers.gaussian_denoise_fn(p, MU, S, mt), mt)
      x0, eps = den(jnp.asarray(x), jnp.asarray(t))
      np.testing.assert_allclose(eps - x0, want, rtol=1e-9, atol=1e-9, err_msg=f'{mt} {seed}')
    score = -eps / t[:, None]
    np.testing.assert_allclose(ct.pf_ode_drift(p, jnp.asarray(x), jnp.asarray(t), score), want,
                               rtol=1e-9, atol=1e-9, err_msg=f'seed {seed}')


@pytest.mark.parametrize('t', [0.1, 0.5, 0.9])
def test_the_loss_at_the_ideal_velocity_is_the_conditional_variance(t):
  """Monte Carlo over 200,000 pairs: the loss at u* is 1 + s² − c²v_t; a velocity off by δ
  costs δ² more (and the sign-flipped target x₀ − ε is far off)."""
  seed = oracles.new_seed()
  k0, k1 = jax.random.split(jax.random.key(seed))
  n = 200_000
  x0 = MU + S * jax.random.normal(k0, (n, 1), jnp.float32)
  noise = jax.random.normal(k1, (n, 1), jnp.float32)
  tt = jnp.full((n,), t, jnp.float32)
  ideal = lambda x, tb: jnp.asarray(_ideal_velocity(x, tb[:, None]), jnp.float32)
  per = fm.loss(ideal, x0, tt, noise)
  v = (1 - t) ** 2 * S ** 2 + t ** 2
  want = 1 + S ** 2 - (t - (1 - t) * S ** 2) ** 2 / v
  se = float(jnp.std(per)) / math.sqrt(n)
  got = float(jnp.mean(per))
  print(f't={t}: loss {got:.5f} vs {want:.5f} (se {se:.1e}, seed {seed})')
  assert abs(got - want) < 5 * se, seed
  off = float(jnp.mean(fm.loss(lambda x, tb: ideal(x, tb) + 0.1, x0, tt, noise)))
  assert abs(off - want - 0.01) < 5 * se, seed
  assert float(jnp.mean(fm.loss(lambda x, tb: -ideal(x, tb), x0, tt, noise))) > want + 0.1


@pytest.mark.parametrize('density,mean,std', [('uniform', 0.0, 1.0),
                                              ('logit_normal', 0.0, 1.0),
                                              ('logit_normal', 0.5, 0.6)])
def test_time_densities_draw_what_their_densities_say(density, mean, std):
  """Kolmogorov–Smirnov against scipy's distribution (logit-normal: logit t ~ N(m, s²)), and
  log_density against the same pdf; s = 0.6 tells a std from a variance."""
  seed = oracles.new_seed()
  lo, hi = 1e-3, 1 - 1e-3
  t = np.asarray(fm.sample_time(jax.random.key(seed), (20000,), density, lo, hi, mean, std),
                 np.float64)
  assert t.min() >= lo and t.max() <= hi
  if density == 'uniform':
    cdf = stats.uniform(lo, hi - lo).cdf
    pdf = lambda x: np.full_like(x, 1 / (hi - lo))
  else:
    cdf = lambda x: stats.norm(mean, std).cdf(np.log(x) - np.log1p(-x))
    pdf = lambda x: stats.norm(mean, std).pdf(np.log(x) - np.log1p(-x)) / (x * (1 - x))
  result = stats.kstest(t, cdf)
  print(f'{density} ({mean}, {std}): KS p = {result.pvalue:.3f} (seed {seed})')
  assert result.pvalue > 1e-3, seed
  grid = np.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(np.exp(fm.log_density(jnp.asarray(grid), density, lo, hi, mean,
                                                   std)), pdf(grid), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Solvers and the likelihood on the flow.
# ------------------------------------------------------------------------------------------

# (solver, options, schedule, step counts, order): where each is in its asymptotic range.
FLOW_ORDER_CASES = [
    ('euler', {}, 'time_uniform', (10, 20, 40), 1.0),
    ('heun', {}, 'logsnr', (10, 20, 40), 2.0),
    ('dpmpp_2m', {'lower_order_final': False}, 'logsnr', (20, 40, 80), 2.0),
    # On uniform λ steps 3M's error here falls at order 4 (its third-order term cancels on this
    # data): the Karras levels show its order.
    ('dpmpp_3m', {'lower_order_final': False}, 'karras', (40, 80, 160), 3.0),
]


@pytest.mark.parametrize('kind,options,schedule,steps,order', FLOW_ORDER_CASES,
                         ids=[c[0] for c in FLOW_ORDER_CASES])
def test_ode_solvers_converge_at_their_orders_on_the_flow(kind, options, schedule, steps, order):
  with jax.enable_x64(True):
    p = ct.FlowProcess()
    den = ct.make_denoiser(p, helpers.gaussian_denoise_fn(p, MU, S, 'flow'), 'flow')
    seed = oracles.new_seed()
    x_t = jax.random.normal(jax.random.key(seed), (4, 8), jnp.float64)
    ref = oracles.exact_map(p, x_t, p.t_max, p.t_min, MU, S)
    run = jax.jit(functools.partial(sv.solve, kind, den, **options))
    errs = []
    for n in steps:
      out = run(x_t, sv.step_schedule(p, n, schedule))
      errs.append(float(jnp.max(jnp.abs(out.x_end - ref)) / jnp.max(jnp.abs(ref))))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f'flow {kind} ({schedule}): order {slope:.2f} over steps {steps}, relative errors '
          + ', '.join(f'{e:.2e}' for e in errs) + f' (seed {seed})')
    assert abs(slope - order) < 0.35, (kind, slope, errs, seed)


def test_ddim_on_the_trailing_levels_is_eulers_k_step_sampler():
  """Rectified flow's K-step sampler: x ← x + (s − t) u at t_j = t_max(1 − j/K), the last step
  to t = 0; ddim (the flow's default schedule) with K levels is it, in K evaluations."""
  seed = oracles.new_seed()
  p = ct.FlowProcess()
  den = ct.make_denoiser(p, helpers.gaussian_denoise_fn(p, MU, S, 'flow'), 'flow')
  x_t = jax.random.normal(jax.random.key(seed), (16, 3))
  for k in (1, 2, 4):
    cfg = sampler_config.SamplerConfig('ddim', steps=k, clip_denoised=False)
    sched = sampler_lib.schedule_of(cfg, p)
    levels = p.t_max * (1 - np.arange(k) / k)
    np.testing.assert_allclose(sched.t, levels, rtol=1e-6)
    out = sv.solve('ddim', den, x_t, sched)
    x = np.asarray(x_t, np.float64)
    for j, t in enumerate(levels):
      s = levels[j + 1] if j + 1 < k else 0.0
      x = x + (s - t) * _ideal_velocity(x, t)
    assert int(out.nfe) == k
    np.testing.assert_allclose(out.x0, x, rtol=1e-4, atol=1e-4, err_msg=f'K={k}, seed {seed}')


@pytest.mark.parametrize('kind', ['sde', 'pc', 'ddpm'])
def test_stochastic_samplers_recover_the_gaussian_on_the_flow(kind):
  """The reverse SDE, PC and the ancestral chain on the flow, 500 log-SNR steps (ddpm: its
  trailing levels), from the prior; mean within 1% of μ = 1, std within 2.5% of 0.5."""
  seed = oracles.new_seed()
  p = ct.FlowProcess()
  mu, s = 1.0, 0.5
  den = ct.make_denoiser(p, helpers.gaussian_denoise_fn(p, mu, s, 'flow'), 'flow')
  k_x, k_run = jax.random.split(jax.random.key(seed))
  x_t = p.prior_sample(k_x, (2048, 16))
  cfg = sampler_config.SamplerConfig(kind, steps=500, clip_denoised=False)
  sched = sampler_lib.schedule_of(cfg, p)
  out = jax.jit(lambda x, k: sv.solve(kind, den, x, sched, k))(x_t, k_run)
  mean, std = float(jnp.mean(out.x0)), float(jnp.std(out.x0))
  print(f'flow {kind}: mean {mean:.4f}, std {std:.4f} (seed {seed})')
  assert mean == pytest.approx(mu, rel=0.01) and std == pytest.approx(s, rel=0.025), seed


# ------------------------------------------------------------------------------------------
# The spec and the training step.
# ------------------------------------------------------------------------------------------


def _flow_spec(config_name='digits_flow', **changes):
  return helpers.digits_spec(config_name, **changes)


def test_the_flow_spec_is_recorded_and_fixed_on_resume():
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  spec = _flow_spec()
  assert isinstance(spec.diffusion.make_process(), ct.FlowProcess)
  assert spec.diffusion.t_density is fm.TimeDensity.LOGIT_NORMAL
  assert spec.model.time_scale == 1000.0
  assert spec_lib.ExperimentSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
  for key, value in (('diffusion.t_density', 'uniform'), ('diffusion.t_mean', 0.5),
                     ('diffusion.t_std', 0.8)):
    fixed, _ = spec_lib.differences(spec, _flow_spec(**{key: value}))
    assert [name for name, _, _ in fixed] == [key], fixed
  # A spec.json written before the flow fields reads as uniform.
  stored = _flow_spec(config_name='digits').to_json()
  for k in ('t_density', 't_mean', 't_std'):
    del stored['diffusion'][k]
  assert spec_lib.ExperimentSpec.from_json(stored) == _flow_spec(config_name='digits')
  # ...and a resume of it sees no difference (its workdir resumes).
  assert spec_lib.differences(stored, _flow_spec(config_name='digits')) == ([], [])


@pytest.mark.parametrize('changes, fragments', [
    ({'diffusion.process': 'vp', 'diffusion.objective': 'dsm', 'diffusion.t_density': 'uniform'},
     ("mean_type 'flow'", "'vp'")),
    ({'diffusion.process': 'subvp'}, ("objective 'flow'", "'subvp'")),
    ({'diffusion.mean_type': 'eps'}, ("mean_type 'flow'", "'eps'")),
    ({'diffusion.objective': 'dsm', 'diffusion.mean_type': 'eps'}, ('t_density', "'dsm'")),
    ({'diffusion.t_std': 0.0}, ('t_std', '0.0')),
    ({'diffusion.t_density': 'mode'}, ('diffusion.t_density', "'mode'", "'logit_normal'")),
    ({'diffusion.var_type': 'learned_range'}, ("'learned_range'", "'flow'")),
    ({'eval.sampler': 'ald'}, ("'ald'", "'flow'")),
])
def test_bad_flow_specs_are_one_line_errors(changes, fragments):
  with pytest.raises(ValueError) as e:
    _flow_spec(**changes)
  oracles.assert_one_line_error(e.value, *fragments)


def test_the_flow_step_trains_the_velocity_of_float64():
  """`step.flow_terms` with a fixed toy network against a float64 NumPy re-derivation."""
  from diffusion_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  p = ct.FlowProcess()
  x0, noise = rng.uniform(-1, 1, (6, 4, 4, 1)), rng.normal(size=(6, 4, 4, 1))
  t = rng.uniform(p.t_min, p.t_max, 6)
  net = lambda x, n: 0.7 * x - 0.2 + n.reshape(-1, 1, 1, 1) / 1000.0
  terms = step_lib.flow_terms(p, net, jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.float32),
                              jnp.asarray(noise, jnp.float32))
  x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
  u = 0.7 * x_t - 0.2 + t[:, None, None, None]
  want = np.mean((u - (noise - x0)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(terms['loss'], want, rtol=1e-5, err_msg=f'seed {seed}')


# ------------------------------------------------------------------------------------------
# Reflow.
# ------------------------------------------------------------------------------------------


def _reflow_spec(**kw):
  return helpers.digits_spec('digits_reflow', teacher=(_flow_spec(), 2600),
                             **{'distill.teacher': '/nowhere', **kw})


def test_reflow_spec_rules():
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  build = _reflow_spec
  spec = build()
  assert spec.distill.method is spec_lib.DistillMethod.REFLOW
  assert spec.diffusion.t_density is fm.TimeDensity.UNIFORM   # the student's own
  assert spec_lib.ExperimentSpec.from_json(spec.to_json()) == spec
  fixed, _ = spec_lib.differences(spec, build(**{'distill.num_pairs': 6000}))
  assert [n for n, _, _ in fixed] == ['distill.num_pairs'], fixed
  # A cd student's spec.json written before reflow's fields resumes without a difference.
  cd = helpers.digits_spec('digits_cd', teacher=(_flow_spec(config_name='digits'), 2600),
                           **{'distill.teacher': '/nowhere'})
  stored = cd.to_json()
  for k in ('num_pairs', 'pair_sampler', 'pair_steps'):
    del stored['distill'][k]
  assert spec_lib.differences(stored, cd) == ([], [])
  for kw, fragments in (({'distill.pair_sampler': 'sde'}, ('pair_sampler', "'sde'", 'heun')),
                        ({'distill.num_pairs': 0}, ('num_pairs', '0')),
                        ({'distill.method': 'cd'}, ("'cd'", "'flow'", "'reflow'"))):
    with pytest.raises(ValueError) as e:
      build(**kw)
    oracles.assert_one_line_error(e.value, *fragments)


def test_pairs_made_under_other_settings_are_refused_not_mixed(tmp_path):
  from diffusion_jax.training import reflow  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(tmp_path)
  reflow.check_manifest(_reflow_spec(), workdir, is_chief=True)
  reflow.check_manifest(_reflow_spec(), workdir, is_chief=True)   # the same: fine
  (workdir / reflow.PAIRS_DIR / '00000.npz').write_bytes(b'kept')
  for spec, name in ((_reflow_spec(**{'distill.pair_steps': 10}), 'pair_steps'),
                     (dataclasses.replace(_reflow_spec(), seed=1), 'seed')):
    with pytest.raises(ValueError) as e:
      reflow.check_manifest(spec, workdir, is_chief=True)
    oracles.assert_one_line_error(e.value, name, 'move')
  assert (workdir / reflow.PAIRS_DIR / '00000.npz').read_bytes() == b'kept'


def test_the_pair_stream_is_shuffled_checkpointable_and_carries_the_noise():
  from diffusion_jax.training import reflow  # pylint: disable=g-import-not-at-top
  n = 50
  x0 = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.float32)
  noise = -x0
  it = reflow.PairIterator(x0, noise, global_batch_size=8, seed=3)
  batches = [next(it) for _ in range(9)]
  seen = np.concatenate([b['image'][:, 0, 0, 0] for b in batches])
  assert sorted(seen[:48].tolist()) == sorted(np.random.default_rng([3, 0]).permutation(n)[:48]
                                              .astype(float).tolist())
  for b in batches:
    np.testing.assert_array_equal(b['noise'], -b['image'])
  state = it.get_state()
  want = next(it)
  again = reflow.PairIterator(x0, noise, global_batch_size=8, seed=3)
  again.set_state(state)
  got = next(again)
  np.testing.assert_array_equal(got['image'], want['image'])


@pytest.mark.slow
def test_reflow_makes_its_pairs_once_and_resumes_after_a_kill(child_env, tmp_path):
  """A tiny flow teacher; a reflow run killed right after its first chunk of pairs keeps that
  chunk (same bytes, same time) and makes only the second when it resumes; the pairs are the
  teacher's ODE from chunk_noise; the finished run samples with Euler in 2 evaluations."""
  from diffusion_jax.storage import paths  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import reflow  # pylint: disable=g-import-not-at-top
  teacher, student = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  run = lambda *args, env=None: subprocess.run(
      [sys.executable, *args], env=env or child_env['env'], cwd=ROOT, capture_output=True,
      text=True, timeout=900)
  common = [f'--config.data.data_dir={child_env["data_dir"]}',
            '--config.training.num_train_steps=4', '--config.training.log_every_steps=2',
            '--config.training.checkpoint_every_steps=4', '--config.training.sample_every_steps=0',
            '--config.eval.every_steps=0', '--config.model.ch_mult=(1,2)',
            '--config.model.attn_resolutions=()', '--config.training.batch_size=8']
  helpers.assert_ok(run(os.path.join(ROOT, 'train.py'), '--config=configs/digits_flow.py',
                        f'--workdir={teacher}', *common))
  reflow_args = [os.path.join(ROOT, 'train.py'), '--config=configs/digits_reflow.py',
                 f'--workdir={student}', f'--config.distill.teacher={teacher}',
                 '--config.distill.num_pairs=700', '--config.distill.pair_steps=3', *common]
  env = dict(child_env['env'], DIFFUSION_JAX_FAULT='pairs_written:0:kill')
  killed = run(*reflow_args, env=env)
  assert killed.returncode != 0
  first = reflow.chunk_path(paths.as_path(student), 0)
  assert first.exists() and not reflow.chunk_path(first.parent.parent, 1).exists()
  stamp, data = os.path.getmtime(first), first.read_bytes()
  assert not os.path.exists(os.path.join(student, 'checkpoints', '4'))
  result = helpers.assert_ok(run(*reflow_args))
  assert 'making 1 of 2 chunks' in result.stderr, result.stderr[-3000:]
  assert os.path.getmtime(first) == stamp and first.read_bytes() == data
  # The pairs are the teacher's ODE (dpmpp_2m, 3 steps) from chunk i's noise.
  from diffusion_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  spec = workdir_lib.read_spec(paths.as_path(student))
  make = reflow.pair_maker(spec)
  with np.load(str(reflow.chunk_path(first.parent.parent, 1))) as f:
    noise = np.asarray(reflow.chunk_noise(spec.seed, 1, (8, 8, 1)))
    # (The child and this process may round the normal draws differently in the last bit.)
    np.testing.assert_allclose(f['noise'], noise, rtol=0, atol=1e-6)
    np.testing.assert_allclose(f['x0'], np.asarray(make(noise)), atol=1e-5)
  # A resume finds every pair and runs without the teacher.
  os.rename(teacher, teacher + '.gone')
  result = helpers.assert_ok(run(*reflow_args, '--config.training.num_train_steps=8'))
  assert 'making' not in result.stderr
  result = helpers.assert_ok(run(os.path.join(ROOT, 'sample.py'), f'--workdir={student}',
                                 '--num_samples=4', '--steps=2'))
  assert '2 model evaluations' in result.stdout, result.stdout
