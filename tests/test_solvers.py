"""Solvers on analytic Gaussian data: x₀ ~ N(μ, s²) per coordinate with its exact denoiser.

The PF-ODE then maps x_t to α'μ + √(v'/v)(x_t − αμ), v = α²s² + σ², exactly; each solver's
state at t_N = 1/T is compared with that map of its own x_T.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from diffusion_jax.process import continuous as ct
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers as sv

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles

T = 1000
MU, S = 0.3, 0.5


def gaussian_denoise_fn(p, mean_type='eps', mu=MU, extra_channels=0):
  """The exact model of x₀ ~ N(mu, S²) as `denoise_fn(x, model_timestep)` (tests/oracles.py)."""
  return oracles.gaussian_denoise_fn(oracles.process_alpha_sigma(p), mu, S, mean_type,
                                     extra_channels)


def normal_quantiles(shape):
  """N(0, 1) quantiles at the midpoints of `prod(shape)` equal-mass bins, shuffled into
  `shape`: a low-variance stand-in for x_T ~ N(0, I) when the solver is deterministic."""
  n = int(np.prod(shape))
  q = special.ndtri((np.arange(n) + 0.5) / n)
  return np.random.default_rng(0).permutation(q).reshape(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Orders of convergence, in float64 so that the smallest errors sit far above round-off.
# ------------------------------------------------------------------------------------------

# (solver, options, step counts, expected order): oracles.ORDER_CASES, shared with the VE test.
@pytest.mark.slow
@pytest.mark.parametrize('kind,options,steps,order', oracles.ORDER_CASES,
                         ids=[c[0] for c in oracles.ORDER_CASES])
def test_terminal_error_shrinks_at_the_solver_order(kind, options, steps, order):
  with jax.enable_x64(True):
    p = helpers.linear_vp_process(T)
    den = ct.make_denoiser(p, gaussian_denoise_fn(p), 'eps')
    seed = oracles.new_seed()
    x_t = jax.random.normal(jax.random.key(seed), (4, 8), jnp.float64)
    ref = oracles.exact_map(p, x_t, 1.0, p.t_min, MU, S)
    run = jax.jit(functools.partial(sv.solve, kind, den, **options))
    errs = []
    for n in steps:
      sched = sv.step_schedule(p, n, 'karras')
      out = run(x_t, sched)
      errs.append(float(jnp.max(jnp.abs(out.x_end - ref)) / jnp.max(jnp.abs(ref))))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f'{kind}: order {slope:.2f} over steps {steps}, relative errors '
          + ', '.join(f'{e:.2e}' for e in errs))
    assert abs(slope - order) < 0.35, (kind, slope, errs, seed)


# ------------------------------------------------------------------------------------------
# DPM-Solver++ against a float64 NumPy re-derivation.
# ------------------------------------------------------------------------------------------


def _numpy_dpmpp(lam, x, order, lower_order_final):
  """DPM-Solver++ from the paper, in float64, with the exact Gaussian data prediction.

  x_{i+1} = (σ_{i+1}/σ_i) x_i + σ_{i+1} ∫ e^λ P(λ) dλ over [λ_i, λ_{i+1}], P being: the
  last prediction (1st order); the paper's 2M, whose integral is −α_{i+1}(e^{−h}−1)D with
  D = (1 + 1/(2r)) m_i − 1/(2r) m_{i−1}; the Lagrange quadratic through the last three
  predictions, integrated by Gauss–Legendre quadrature (3rd order).
  """
  alpha = np.sqrt(special.expit(2 * lam))
  sigma = np.sqrt(special.expit(-2 * lam))
  n = len(lam) - 1
  nodes, weights = np.polynomial.legendre.leggauss(12)
  ms = []
  for i in range(n):
    k = min(order, i + 1)
    if lower_order_final and n < 10:
      k = min(k, n - i)
    a, s = alpha[i], sigma[i]
    ms.append(MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * MU))
    h = lam[i + 1] - lam[i]
    if k == 1:
      integral = alpha[i + 1] * (1 - np.exp(-h)) * ms[-1]
    elif k == 2:
      r = (lam[i] - lam[i - 1]) / h
      dd = (1 + 1 / (2 * r)) * ms[-1] - 1 / (2 * r) * ms[-2]
      integral = -alpha[i + 1] * np.expm1(-h) * dd
    else:
      pts = lam[i - 2:i + 1]
      vals = ms[-3:]
      ls = lam[i] + (nodes + 1) / 2 * h
      integral = 0.0
      for lq, wq in zip(ls, weights):
        poly = sum(v * np.prod([(lq - pts[m]) / (pts[j] - pts[m]) for m in range(3) if m != j])
                   for j, v in enumerate(vals))
        integral = integral + wq * h / 2 * np.exp(lq) * poly
      integral = sigma[i + 1] * integral
    x = sigma[i + 1] / sigma[i] * x + integral
  return x


@pytest.mark.parametrize('kind,order', [('dpmpp_2m', 2), ('dpmpp_3m', 3)])
@pytest.mark.parametrize('num_steps,lower_order_final', [(6, True), (12, False)])
def test_dpmpp_matches_numpy_float64(kind, order, num_steps, lower_order_final):
  with jax.enable_x64(True):
    p = helpers.linear_vp_process(T)
    den = ct.make_denoiser(p, gaussian_denoise_fn(p), 'eps')
    seed = oracles.new_seed()
    x_t = np.random.default_rng(seed).normal(size=(3, 4))
    sched = sv.step_schedule(p, num_steps, 'time_uniform')
    fn = sv.dpmpp_2m if order == 2 else sv.dpmpp_3m
    got = fn(den, jnp.asarray(x_t), sched, lower_order_final=lower_order_final)
    want = _numpy_dpmpp(np.asarray(sched.lam, np.float64), x_t, order, lower_order_final)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10, err_msg=f'seed {seed}')


# ------------------------------------------------------------------------------------------
# Distributions.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpmpp_2m_recovers_mean_and_std():
  """At 20 steps (21 evaluations) the mean is within 1% and the std 1.3% high on this process
  (a float64 NumPy run of the paper's 2M gives the same +1.30%); 25 steps bring both within 1%."""
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, gaussian_denoise_fn(p), 'eps')
  x_t = jnp.asarray(normal_quantiles((8192, 8)))
  run = jax.jit(functools.partial(sv.solve, 'dpmpp_2m', den))
  for steps, std_tol in ((20, 0.015), (25, 0.01)):
    out = run(x_t, sv.step_schedule(p, steps, 'logsnr'))
    mean, std = float(jnp.mean(out.x0)), float(jnp.std(out.x0))
    print(f'dpmpp_2m, {steps} steps ({int(out.nfe)} evaluations): mean {mean:.4f} '
          f'({mean / MU - 1:+.2%}), std {std:.4f} ({std / S - 1:+.2%})')
    assert int(out.nfe) == sv.num_evaluations('dpmpp_2m', steps) == steps + 1
    assert mean == pytest.approx(MU, rel=0.01)
    assert std == pytest.approx(S, rel=std_tol)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['sde', 'pc'])
def test_sde_and_pc_recover_std_at_1000_steps(kind):
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, gaussian_denoise_fn(p), 'eps')
  k_x, k_run = jax.random.split(jax.random.key(seed))
  x_t = jax.random.normal(k_x, (16384, 8))
  out = jax.jit(functools.partial(sv.solve, kind, den))(
      x_t, sv.step_schedule(p, 1000, 'time_uniform'), k_run)
  mean, std = float(jnp.mean(out.x0)), float(jnp.std(out.x0))
  # Langevin at signal-to-noise r has step ε ≈ 2r²v on a Gaussian of variance v, whose
  # stationary std is √v/√(1 − ε/(2v)): a bias of (1 − r²)^(-1/2) − 1 = +1.3% at r = 0.16.
  note = (f"; the corrector's expected bias gives {S / np.sqrt(1 - 0.16 ** 2):.4f}"
          if kind == 'pc' else '')
  print(f'{kind}, 1000 steps: mean {mean:.4f} std {std:.4f} (seed {seed}){note}')
  assert std == pytest.approx(S, rel=0.02), seed
  assert mean == pytest.approx(MU, abs=0.03), seed


@pytest.mark.slow
def test_adaptive_ode_is_accurate_and_counts_evaluations():
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  calls = []

  def counted(x, n):
    jax.debug.callback(lambda: calls.append(1))
    return gaussian_denoise_fn(p)(x, n)

  den = ct.make_denoiser(p, counted, 'eps')
  x_t = jax.random.normal(jax.random.key(seed), (4, 8))
  ref = oracles.exact_map(p, x_t, 1.0, p.t_min, MU, S)
  sched = sv.step_schedule(p, 1)
  out = jax.jit(functools.partial(sv.solve, 'ode', den, rtol=1e-6, atol=1e-6))(x_t, sched)
  jax.effects_barrier()
  rel = float(jnp.max(jnp.abs(out.x_end - ref)) / jnp.max(jnp.abs(ref)))
  print(f'adaptive Tsit5 at rtol = atol = 1e-6: relative error {rel:.2e}, '
        f'{int(out.nfe)} evaluations')
  assert rel <= 1e-3, seed
  assert int(out.nfe) == len(calls), (int(out.nfe), len(calls))


# ------------------------------------------------------------------------------------------
# Parametrisations, learned variance, guidance, schedules, errors.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['heun'])
def test_mean_types_give_the_same_samples(kind):
  seed = oracles.new_seed()
  p = helpers.linear_vp_process(T)
  k_x, k_run = jax.random.split(jax.random.key(seed))
  x_t = jax.random.normal(k_x, (3, 2, 2, 2))
  sched = sv.step_schedule(p, 4)
  outs = {}
  for mt in ('eps', 'xstart', 'v'):
    den = ct.make_denoiser(p, gaussian_denoise_fn(p, mt, extra_channels=2), mt)
    opts = {'s_churn': 1.0} if kind == 'heun' else {}
    outs[mt] = sv.solve(kind, den, x_t, sched, k_run, **opts).x0
  for mt in ('xstart', 'v'):
    np.testing.assert_allclose(outs[mt], outs['eps'], rtol=2e-4, atol=2e-4,
                               err_msg=f'{kind} {mt} seed {seed}')


class _GaussianLabelModel(nn.Module):
  """The exact ε of N(μ_y, s²) data: μ_y = 0.3 for labels 0..n−1, −0.2 for the null label."""
  num_classes: int
  process: ct.VPProcess

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    scale = self.param('scale', nn.initializers.ones, ())
    mu = jnp.where(y == self.num_classes, -0.2, MU)[:, None]
    eps = oracles.gaussian_denoise_fn(oracles.process_alpha_sigma(self.process), mu, S)
    return scale * eps(x, t)


@pytest.mark.slow
def test_classifier_free_guidance_composes():
  p = helpers.linear_vp_process(T)
  model = _GaussianLabelModel(num_classes=2, process=p)
  params = {'scale': jnp.ones(())}
  labels = jnp.array([0, 1, 0])
  w = 1.5
  guided = sampler_lib.make_denoise_fn(model, params, labels, guidance_scale=w, num_classes=2)
  cond = sampler_lib.make_denoise_fn(model, params, labels)
  uncond = sampler_lib.make_denoise_fn(model, params, jnp.full((3,), 2))
  x = jax.random.normal(jax.random.key(1), (3, 5))
  t = jnp.array([0.02, 0.5, 1.0])
  got = ct.make_denoiser(p, guided, 'eps')(x, t)[0]
  want = ((1 + w) * ct.make_denoiser(p, cond, 'eps')(x, t)[0]
          - w * ct.make_denoiser(p, uncond, 'eps')(x, t)[0])
  # At t = 1, x̂₀ = (x − σε)/α amplifies float32 rounding by 1/α ≈ 156.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  sched = sv.step_schedule(p, 3)
  assert np.all(np.isfinite(sv.solve('dpmpp_2m', ct.make_denoiser(p, guided, 'eps'),
                                     x, sched).x0))


def test_step_schedules():
  with jax.enable_x64(True):
    p = helpers.linear_vp_process(T)
    n = 8
    u = np.linspace(0, 1, n + 1)
    lam_lo, lam_hi = float(p.lambda_min()), float(p.lambda_max())
    for kind in sv.ScheduleKind:
      sched = sv.step_schedule(p, n, kind.value)
      t = np.asarray(sched.t)
      # 'trailing' stops at 1/(N + 1): the top N + 1 of a grid that ends at t = 0.
      trailing = kind is sv.ScheduleKind.TRAILING   # float32 levels
      bottom = 1 / (n + 1) if trailing else 1 / T
      assert t.shape == (n + 1,) and t[0] == 1.0 and t[-1] == pytest.approx(
          bottom, abs=1e-7 if trailing else 1e-15)
      assert np.all(np.diff(t) < 0), kind
    np.testing.assert_allclose(sv.step_schedule(p, n, 'trailing').t, 1 - np.arange(n + 1) / (n + 1),
                               rtol=1e-7)
    np.testing.assert_allclose(sv.step_schedule(p, n, 'time_uniform').t, 1 + u * (1 / T - 1))
    np.testing.assert_allclose(sv.step_schedule(p, n, 'logsnr').lam,
                               lam_lo + u * (lam_hi - lam_lo), rtol=1e-9, atol=1e-9)
    s_max, s_min = np.exp(-lam_lo), np.exp(-lam_hi)
    karras = (s_max ** (1 / 7) + u * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(np.exp(-np.asarray(sv.step_schedule(p, n, 'karras').lam)),
                               karras, rtol=1e-9)
  # 'respaced': DDPM's own timesteps τ_k = round(k (T − 1)/N), largest first, at t = (τ + 1)/T;
  # the model sees the integers τ themselves (float32, as the chains run).
  p = helpers.linear_vp_process(T)
  taus = np.round(np.arange(n + 1) * (T - 1) / n)[::-1]
  sched = sv.step_schedule(p, n, 'respaced')
  np.testing.assert_allclose(sched.t, (taus + 1) / T, rtol=1e-6)
  np.testing.assert_array_equal(p.model_timestep(sched.t), taus)
  np.testing.assert_array_equal(sv.level_schedule(p, n + 1).t, sched.t)


def test_num_evaluations():
  assert sv.num_evaluations('euler', 10) == 11
  assert sv.num_evaluations('heun', 10) == 21
  assert sv.num_evaluations('dpmpp_3m', 10) == 11
  assert sv.num_evaluations('sde', 10) == 11
  assert sv.num_evaluations('pc', 10) == 21
  assert sv.num_evaluations('pc', 10, corrector_steps=2) == 31
  assert sv.num_evaluations('ddpm', 10) == 11 and sv.num_evaluations('ddim', 10) == 11
  assert sv.num_evaluations('ald', 10, steps_per_level=3) == 34


def test_bad_inputs_raise_one_line_errors():
  p = helpers.linear_vp_process(T)
  den = ct.make_denoiser(p, gaussian_denoise_fn(p), 'eps')
  x = jnp.zeros((2, 3))
  cases = [
      (lambda: sv.solve('dpm', den, x, sv.step_schedule(p, 3)),
       r"unknown sampler 'dpm'; allowed: 'ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', "
       r"'dpmpp_3m', 'sde', 'pc', 'ode', 'ald', 'consistency'$"),
      (lambda: sv.step_schedule(p, 3, 'cosine'),
       r"unknown step_schedule 'cosine'; allowed: 'time_uniform', 'logsnr', 'karras', "
       r"'respaced', 'trailing'$"),
      (lambda: sv.step_schedule(ct.make_process('ve', sigma_min=0.01, sigma_max=50.0), 3,
                                'respaced'),
       r"step_schedule 'respaced' .* needs the 'vp' process, not 've'"),
      (lambda: sv.step_schedule(p, T, 'respaced'), r'steps must be an integer in \[1, 999\]'),
      (lambda: sv.level_schedule(p, T + 1), r'steps must be an integer in \[1, 1000\]'),
      (lambda: sv.solve('ddpm', den, x, sv.level_schedule(p, 3)), r"'ddpm' draws noise"),
      (lambda: sv.solve('ddim', den, x, sv.level_schedule(p, 3), eta=-1.0), 'eta must be >= 0'),
      (lambda: jax.jit(lambda t: sv.solve('ddim', den, x, sv.schedule_from_times(p, t)).x0)(
          sv.level_schedule(p, 3).t), 'on the host'),
      (lambda: sv.solve('ald', den, x, sv.step_schedule(p, 3), jax.random.PRNGKey(0)),
       r"'ald' .* defined for the 've'.* only, not 'vp'"),
      (lambda: sv.step_schedule(p, 0), r'steps must be an integer in \[1, 1000\], got 0'),
      (lambda: sv.step_schedule(p, T + 1), r'steps must be an integer in \[1, 1000\], got 1001'),
      (lambda: sv.step_schedule(p, 2.5), r'got 2.5'),
      (lambda: sv.solve('sde', den, x, sv.step_schedule(p, 3)), r"'sde' draws noise"),
      (lambda: sv.solve('heun', den, x, sv.step_schedule(p, 3), s_churn=1.0), 'needs an rng'),
      (lambda: sv.num_evaluations('ode', 3), 'adaptive'),
      (lambda: sv.solve('ode', den, x, sv.step_schedule(p, 3), method='rk4'),
       "unknown ode method 'rk4'"),
  ]
  for fn, pattern in cases:
    with pytest.raises(ValueError, match=pattern) as e:
      fn()
    oracles.assert_one_line_error(e.value)
