"""Distillation (docs/distillation.md): consistency distillation, progressive distillation, the
consistency sampler and the distilled workdir, checked where everything is known in closed form.

For Gaussian data x₀ ~ N(μ, s²) per coordinate the PF-ODE is linear in x̃ = x/α with σ̃ = σ/α:
(x̃ − μ)/√(s² + σ̃²) is constant along a trajectory, so the ideal consistency function is

    f*(x̃, σ̃) = μ + (x̃ − μ)·√(s² + σ̃_min²)/√(s² + σ̃²),

and one Heun step of it, from σ_a to σ_b (h = σ_b − σ_a, κ = σ/(s² + σ²)), multiplies x̃ − μ by
g = 1 + h/2·(κ_a + κ_b(1 + hκ_a)). The expected values below are computed from these in
float64 NumPy, not with the library's code.
"""

from __future__ import annotations

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import oracles
from diffusion_jax import spec as spec_lib
from diffusion_jax.process import consistency
from diffusion_jax.process import continuous as ct
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import solvers
from diffusion_jax.training import distill
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState

MU, S = 0.3, 0.5
SIGMA_DATA = 0.5
SHAPE = (4, 8, 8, 1)


def _sig64(process, t) -> np.ndarray:
  """σ̃(t) in float64 from the process's α(t) (the test's own σ̃ = √(1 − α²)/α for VP)."""
  a = np.asarray(process.alpha(jnp.asarray(t, jnp.float32)), np.float64)
  if process.kind is ct.ProcessKind.VP:
    return np.sqrt(1.0 - a * a) / a
  return np.asarray(process.sigma(jnp.asarray(t, jnp.float32)), np.float64) / a


def _bc(v, x):
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def ideal_f(process, x, t):
  """f*(x, t) in x-space: x̃ = x/α mapped along its trajectory to σ̃_min."""
  smin = jnp.exp(-process.lam(jnp.asarray(process.t_min, jnp.float32)))
  st = jnp.exp(-process.lam(t))
  xt = x / _bc(process.alpha(t), x)
  return MU + (xt - MU) * jnp.sqrt(S ** 2 + smin ** 2) / _bc(jnp.sqrt(S ** 2 + st ** 2), x)


def ideal_base(process, shift: float = 0.0):
  """A denoiser whose consistency wrapping is f* (+ (1 − c_skip)·shift): solves f = c x̃ +
  (1 − c) D for D, with the paper's c_skip written out here."""
  smin = jnp.exp(-process.lam(jnp.asarray(process.t_min, jnp.float32)))

  def base(x, t):
    st = jnp.exp(-process.lam(t))
    c = _bc(SIGMA_DATA ** 2 / ((st - smin) ** 2 + SIGMA_DATA ** 2), x)
    xt = x / _bc(process.alpha(t), x)
    x0 = jnp.where(c < 1.0, (ideal_f(process, x, t) - c * xt) / jnp.maximum(1.0 - c, 1e-30),
                   0.0) + shift
    return x0, ct.eps_from_x0(x, x0, _bc(process.alpha(t), x), _bc(process.sigma(t), x))
  return base


def exact_teacher_step(teacher, process, x, t_from, t_to):
  """The PF-ODE's exact map (the ideal teacher, solved exactly)."""
  del teacher
  b = lambda t: jnp.reshape(t, (-1, 1, 1, 1))
  return oracles.exact_map(process, x, b(t_from), b(t_to), MU, S)


def karras_sigmas64(smin: float, smax: float, n: int, rho: float = 7.0) -> np.ndarray:
  u = np.arange(n) / (n - 1)
  return (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def heun_gain64(sa, sb):
  ka, kb = sa / (S ** 2 + sa ** 2), sb / (S ** 2 + sb ** 2)
  h = sb - sa
  return 1.0 + 0.5 * h * (ka + kb * (1.0 + h * ka))


def _processes():
  return [helpers.linear_vp_process(1000), ct.make_process('ve', sigma_min=0.01, sigma_max=50.0)]


def _data(rng, n=SHAPE[0]):
  x0 = jnp.asarray(MU + S * rng.standard_normal((n,) + SHAPE[1:]), jnp.float32)
  z = jnp.asarray(rng.standard_normal((n,) + SHAPE[1:]), jnp.float32)
  return x0, z


# ------------------------------------------------------------------------------------------
# The consistency function.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('process', _processes(), ids=['vp', 've'])
def test_the_boundary_holds_exactly_whatever_the_network(process, rng):
  """f(x, σ̃_min) = x̃ bit for bit for any network output (c_skip(σ̃_min) = 1, c_out = 0).
  Planted: c_skip without its σ̃_min offset, σ_d²/(σ̃² + σ_d²) → off by 1e-3 and caught."""
  x = jnp.asarray(rng.standard_normal(SHAPE) * 3, jnp.float32)
  wild = jnp.asarray(rng.standard_normal(SHAPE) * 10, jnp.float32)
  net = lambda x_, t: (wild, jnp.zeros_like(wild))
  f = consistency.consistency_denoiser(net, process, SIGMA_DATA)
  t = jnp.full((SHAPE[0],), process.t_min, jnp.float32)
  x0, eps = f(x, t)
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(x / _bc(process.alpha(t), x)))
  assert np.all(np.isfinite(np.asarray(eps)))
  # Elsewhere the network counts: at σ̃ = 1 the output moves with it.
  t1 = jnp.full((SHAPE[0],), 0.5, jnp.float32)
  assert not np.allclose(np.asarray(f(x, t1)[0]), np.asarray(x / _bc(process.alpha(t1), x)))


def test_c_skip_is_the_papers_offset_form():
  sig = np.array([0.01, 0.02, 0.5, 1.0, 80.0])
  want = SIGMA_DATA ** 2 / ((sig - 0.01) ** 2 + SIGMA_DATA ** 2)
  np.testing.assert_allclose(np.asarray(consistency.c_skip(jnp.asarray(sig), 0.01, SIGMA_DATA)),
                             want, rtol=1e-6)
  assert float(consistency.c_skip(jnp.float32(0.01), 0.01, SIGMA_DATA)) == 1.0


# ------------------------------------------------------------------------------------------
# The consistency-distillation loss.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('process', _processes(), ids=['vp', 've'])
def test_the_consistency_loss_is_zero_at_the_ideal_function_and_its_closed_form_off_it(
    process, rng):
  """With the exact ODE step, L(f*) = 0 at every pair of adjacent levels. With D shifted by δ,
  f moves by (1 − c_skip)δ and L = δ²(c_skip(σ̃_{n+1}) − c_skip(σ̃_n))², for l2, and
  √(dδ²Δc² + c²) − c for pseudo-Huber."""
  x0, z = _data(rng)
  times = distill.cd_times(process, 18)
  f_star = consistency.consistency_denoiser(ideal_base(process), process, SIGMA_DATA)
  delta = 0.05
  f_off = consistency.consistency_denoiser(ideal_base(process, delta), process, SIGMA_DATA)
  sig = _sig64(process, np.asarray(times))
  smin = _sig64(process, np.float32(process.t_min))
  c64 = SIGMA_DATA ** 2 / ((sig - smin) ** 2 + SIGMA_DATA ** 2)
  for n in range(17):
    t_hi = jnp.full((SHAPE[0],), times[n])
    t_lo = jnp.full((SHAPE[0],), times[n + 1])
    at_ideal = distill.cd_loss(f_star, f_star, None, process, x0, t_hi, t_lo, z,
                               teacher_step=exact_teacher_step)
    assert float(jnp.max(at_ideal)) < 1e-10, (n, at_ideal)
    off = distill.cd_loss(f_off, f_off, None, process, x0, t_hi, t_lo, z,
                          teacher_step=exact_teacher_step)
    # f is about 1 and its float32 rounding (~1e-7 per pixel) is what the tolerances allow:
    # compared as root-mean-square differences per pixel, within 1e-6.
    want = delta * abs(c64[n + 1] - c64[n])
    np.testing.assert_allclose(np.sqrt(np.asarray(off, np.float64)), want, rtol=1e-3,
                               atol=1e-6, err_msg=str(n))
    huber = np.asarray(distill.cd_loss(f_off, f_off, None, process, x0, t_hi, t_lo, z,
                                       dist=spec_lib.Distance.PSEUDO_HUBER, huber_c=0.01,
                                       teacher_step=exact_teacher_step), np.float64)
    sum_sq = huber * (huber + 2 * 0.01)      # h = √(q + c²) − c  ⇔  q = h(h + 2c)
    np.testing.assert_allclose(np.sqrt(sum_sq / 64), want, rtol=1e-3, atol=1e-6,
                               err_msg=str(n))


def test_the_default_pseudo_huber_c_is_ict_s():
  assert distill.default_huber_c(64) == pytest.approx(0.00054 * 8)
  a, b = jnp.ones((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 1))
  got = distill.distance(a, b, spec_lib.Distance.PSEUDO_HUBER)
  np.testing.assert_allclose(np.asarray(got), np.sqrt(64 + 0.00432 ** 2) - 0.00432, rtol=1e-6)


def _cd_step_config(process, num_levels=18):
  d = spec_lib.DistillSpec(method='cd', teacher='/teacher', teacher_step=0,
                           teacher_spec={'diffusion': {'parameterization': {'mean_type': 'eps'}}},
                           num_levels=num_levels, sigma_data=SIGMA_DATA)
  return step_lib.StepConfig(parameterization=gd.Parameterization('eps', 'fixedlarge'),
                             distill=d, distill_process=process)


def _as_eps_network(process, denoiser):
  """A `denoise_fn(x, model_timestep)` (an ε network) whose denoiser is `denoiser`."""
  def net(x, n):
    t = helpers.model_time(process, n)
    return denoiser(x, t)[1]
  return net


def test_the_training_steps_loss_takes_one_heun_step_between_adjacent_levels(rng):
  """`step.distill_loss` (what train_step runs) at the ideal student and target with the
  exact Gaussian teacher network: per example u²(r_n − g r_{n+1})², u = x̃_n − μ, r =
  √(s² + σ̃_min²)/√(s² + σ̃²), g Heun's gain between the Karras levels n and n + 1, all in
  float64 here. Planted: the teacher stepping from level n + 1 to n + 2, or to n from n − 1:
  caught (the gain of another pair)."""
  process = helpers.linear_vp_process(1000)
  cfg = _cd_step_config(process)
  teacher_net = helpers.gaussian_denoise_fn(process, MU, S, 'eps')
  base_net = _as_eps_network(process, ideal_base(process))
  frozen = lambda params, x, n: teacher_net(x, n) if params == 'teacher' else base_net(x, n)
  state = types.SimpleNamespace(teacher_params='teacher', target_params='target', step=0)
  # The middle levels (σ̃ 0.4 to 12), where Heun's error (1e-4 to 1e-2 per pixel) stands far
  # above float32 rounding.
  n = jnp.asarray(rng.integers(7, 14, SHAPE[0]), jnp.int32)
  x0, z = _data(rng)
  got = step_lib.distill_loss(cfg, state, base_net, frozen, dict(image=x0, t=n, noise=z))

  smin = _sig64(process, np.float32(process.t_min))
  smax = _sig64(process, np.float32(1.0))
  sig = karras_sigmas64(smin, smax, 18)
  sa, sb = sig[np.asarray(n)], sig[np.asarray(n) + 1]
  r = lambda s_: np.sqrt(S ** 2 + smin ** 2) / np.sqrt(S ** 2 + s_ ** 2)
  u = (np.asarray(x0, np.float64) - MU) + sa[:, None, None, None] * np.asarray(z, np.float64)
  k = (r(sa) - heun_gain64(sa, sb) * r(sb))[:, None, None, None]
  want = np.mean(np.square(u * k), axis=(1, 2, 3))
  assert np.all(np.sqrt(want) > 1e-5), want   # the Heun step's error is visible
  np.testing.assert_allclose(np.sqrt(np.asarray(got, np.float64)), np.sqrt(want), rtol=1e-2,
                             atol=1e-6)


def test_the_target_is_behind_a_stop_gradient(rng):
  """With θ⁻ = θ (μ = 0) the gradient is that of d(f_θ(x_n), c) with c = f_θ(x̂_{n+1}) held
  fixed. Planted: the stop-gradient removed → the gradient differs and is caught."""
  process = helpers.linear_vp_process(1000)
  times = distill.cd_times(process, 18)
  x0, z = _data(rng)
  t_hi, t_lo = jnp.full((SHAPE[0],), times[5]), jnp.full((SHAPE[0],), times[6])
  base = ideal_base(process)

  def f_theta(theta):
    scaled = lambda x, t: (theta * base(x, t)[0], None)
    return consistency.consistency_denoiser(scaled, process, SIGMA_DATA)

  def loss(theta):
    f = f_theta(theta)
    return jnp.sum(distill.cd_loss(f, f, None, process, x0, t_hi, t_lo, z,
                                   teacher_step=exact_teacher_step))

  theta = jnp.float32(1.3)
  x_hi = process.q_sample(x0, t_hi, z)
  x_lo = exact_teacher_step(None, process, x_hi, t_hi, t_lo)
  fixed = f_theta(theta)(x_lo, t_lo)[0]
  online = lambda th: jnp.sum(jnp.mean(jnp.square(f_theta(th)(x_hi, t_hi)[0] - fixed),
                                       axis=(1, 2, 3)))
  both = lambda th: jnp.sum(jnp.mean(jnp.square(
      f_theta(th)(x_hi, t_hi)[0] - f_theta(th)(x_lo, t_lo)[0]), axis=(1, 2, 3)))
  g, g_online, g_both = jax.grad(loss)(theta), jax.grad(online)(theta), jax.grad(both)(theta)
  assert float(g) == pytest.approx(float(g_online), rel=1e-5)
  assert abs(float(g_both) - float(g_online)) > 1e-2 * abs(float(g_online))


def test_the_heun_teacher_step_is_the_heun_solver_and_second_order(rng):
  """`teacher_heun_step` with per-example levels equals the `heun` solver on a shared pair,
  and against the exact map its error falls as h³ per step (local order of a 2nd-order
  method)."""
  process = helpers.linear_vp_process(1000)
  teacher = ct.make_denoiser(process, helpers.gaussian_denoise_fn(process, MU, S, 'eps'), 'eps')
  x0, z = _data(rng)
  x = process.q_sample(x0, jnp.full((SHAPE[0],), 0.3), z)
  a, b = jnp.full((SHAPE[0],), 0.3), jnp.full((SHAPE[0],), 0.25)
  got = distill.teacher_heun_step(teacher, process, x, a, b)
  want = solvers.heun(teacher, x, solvers.schedule_from_times(process, jnp.array([0.3, 0.25])))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  errors = []
  for h in (0.08, 0.04, 0.02):
    hi, lo = jnp.full((SHAPE[0],), 0.3), jnp.full((SHAPE[0],), 0.3 - h)
    step = distill.teacher_heun_step(teacher, process, x, hi, lo)
    exact = exact_teacher_step(None, process, x, hi, lo)
    errors.append(float(jnp.max(jnp.abs(step - exact))))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all(ratios > 5.5), (errors, ratios)   # 8 for h³


# ------------------------------------------------------------------------------------------
# Progressive distillation.
# ------------------------------------------------------------------------------------------


def _ddim64(alphas_cumprod, x, n_from, n_to):
  """A DDIM step of the exact Gaussian denoiser between DDPM's nodes in float64 (n_to = −1:
  the data)."""
  a = np.sqrt(alphas_cumprod[n_from]); sg = np.sqrt(1.0 - alphas_cumprod[n_from])
  x0, eps = oracles.gaussian_posterior(a, sg, x, MU, S)
  if n_to < 0:
    return x0
  return np.sqrt(alphas_cumprod[n_to]) * x0 + np.sqrt(1.0 - alphas_cumprod[n_to]) * eps


@pytest.mark.parametrize('k', [1, 2, 4])
def test_a_pd_round_target_makes_one_student_step_equal_two_teacher_steps(k, rng):
  """On DDPM's own nodes (T = 1000, K | 500: the levels and midpoints are nodes) the student's
  one DDIM step from t with x̂₀ = x̃ lands where the exact teacher's two DDIM steps land, and at
  the last level x̃ is the teacher's x̂₀ at the midpoint. Planted: the midpoint at t − h
  instead of t − h/2 → caught."""
  betas = np.linspace(1e-4, 0.02, 1000)
  ac = np.cumprod(1.0 - betas)
  process = helpers.linear_vp_process(1000)
  teacher = ct.make_denoiser(process, helpers.gaussian_denoise_fn(process, MU, S, 'eps'), 'eps')
  for j in range(k):
    t = 1.0 - j / k
    n_t, n_mid, n_s = round(1000 * t) - 1, round(1000 * (t - 0.5 / k)) - 1, round(
        1000 * (t - 1.0 / k)) - 1
    x0, z = _data(rng)
    x_t = np.sqrt(ac[n_t]) * np.asarray(x0, np.float64) + np.sqrt(1 - ac[n_t]) * np.asarray(
        z, np.float64)
    tb = jnp.full((SHAPE[0],), t, jnp.float32)
    x_tilde = np.asarray(distill.pd_target(teacher, process, jnp.asarray(x_t, jnp.float32), tb,
                                           jnp.int32(k)), np.float64)
    want = _ddim64(ac, _ddim64(ac, x_t, n_t, n_mid), n_mid, n_s)
    if n_s < 0:
      got = x_tilde
    else:
      a_t, s_t = np.sqrt(ac[n_t]), np.sqrt(1 - ac[n_t])
      got = np.sqrt(ac[n_s]) * x_tilde + np.sqrt(1 - ac[n_s]) * (x_t - a_t * x_tilde) / s_t
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=f'k={k} j={j}')


def test_the_pd_loss_is_truncated_snr_weighted(rng):
  process = helpers.linear_vp_process(1000)
  teacher = ct.make_denoiser(process, helpers.gaussian_denoise_fn(process, MU, S, 'eps'), 'eps')
  x0, z = _data(rng)
  delta = 0.1
  for t in (1.0, 0.5, 0.25, 0.05):
    tb = jnp.full((SHAPE[0],), t, jnp.float32)
    x_t = process.q_sample(x0, tb, z)
    aim = distill.pd_target(teacher, process, x_t, tb, jnp.int32(4))
    student = lambda x, tt: (aim + delta, None)
    got = distill.pd_loss(student, teacher, process, x0, tb, jnp.int32(4), z)
    a = float(process.alpha(jnp.float32(t))); sg = float(process.sigma(jnp.float32(t)))
    np.testing.assert_allclose(np.asarray(got), max(a * a / (sg * sg), 1.0) * delta ** 2,
                               rtol=1e-3)


def test_pd_steps_halve_every_round_down_to_the_final_count():
  for step in range(0, 40):
    want = max(16 // 2 ** (step // 5), 2)
    assert distill.pd_steps(step, 16, 2, 5) == want
    assert int(distill.pd_steps(jnp.int32(step), 16, 2, 5)) == want


def test_the_trailing_levels_are_pds_nested_grid():
  process = helpers.linear_vp_process(1000)
  for k in (1, 2, 4, 8):
    t = np.asarray(solvers.level_schedule(process, k, 'trailing').t)
    np.testing.assert_array_equal(t, (1.0 - np.arange(k) / k).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(process.model_timestep(solvers.level_schedule(process, 8, 'trailing').t)),
      [999, 874, 749, 624, 499, 374, 249, 124])
  with pytest.raises(ValueError, match='at most 1000 levels'):
    solvers.level_schedule(process, 2000, 'trailing')


def _toy_state(tx, value):
  p = {'w': jnp.full((3,), value, jnp.float32)}
  return TrainState.create(p, tx, jax.random.PRNGKey(0)).replace(
      teacher_params={'w': jnp.zeros((3,))}, target_params={'w': jnp.full((3,), 5.0)})


def test_a_pd_round_ends_with_the_students_ema_as_teacher_and_start():
  """At the step that ends a round, params, teacher and the optimizer restart from the EMA;
  within a round and after the last one nothing is switched."""
  tx = optax.adam(1e-3)
  d = spec_lib.DistillSpec(method='pd', teacher='/t', teacher_step=0, teacher_spec={},
                           start_steps=4, final_steps=1, steps_per_round=2)
  cfg = step_lib.StepConfig(distill=d, distill_process=helpers.linear_vp_process(100))
  for step, switches in ((0, False), (1, True), (2, False), (3, True), (5, False), (9, False)):
    old = _toy_state(tx, 1.0).replace(step=jnp.int32(step))
    new = old.replace(step=jnp.int32(step + 1), params={'w': jnp.full((3,), 2.0)},
                      ema_params={'w': jnp.full((3,), 1.5)},
                      opt_state=tx.update({'w': jnp.ones(3)}, old.opt_state)[1])
    got = step_lib._distill_after_update(cfg, old, new, tx)  # pylint: disable=protected-access
    if switches:
      for tree in (got.params, got.teacher_params):
        np.testing.assert_array_equal(np.asarray(tree['w']), 1.5)
      assert int(got.opt_state[0].count) == 0
    else:
      np.testing.assert_array_equal(np.asarray(got.params['w']), 2.0)
      np.testing.assert_array_equal(np.asarray(got.teacher_params['w']), 0.0)
      assert int(got.opt_state[0].count) == 1


def test_the_cd_target_is_an_ema_of_the_student():
  tx = optax.adam(1e-3)
  cfg = _cd_step_config(helpers.linear_vp_process(100))
  old = _toy_state(tx, 1.0)
  new = old.replace(step=jnp.int32(1), params={'w': jnp.full((3,), 2.0)})
  got = step_lib._distill_after_update(cfg, old, new, tx)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(got.target_params['w']), 0.95 * 5.0 + 0.05 * 2.0,
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The consistency sampler.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('steps', [1, 2, 4])
def test_the_consistency_sampler_with_the_ideal_function_samples_the_data(steps):
  """f*'s samples are N(μ, s² + σ̃_min²) at any step count (re-noising to σ̃ puts x̃ back on
  N(μ, s² + σ̃²)); K steps are K evaluations. Mean and variance within 5 standard errors of
  200 × 64 draws. Planted: the re-noised x̃ not scaled by α → the variance is caught."""
  seed = oracles.new_seed()
  process = helpers.linear_vp_process(1000)
  f_star = consistency.consistency_denoiser(ideal_base(process), process, SIGMA_DATA)
  calls = []
  counted = lambda x, t: (calls.append(1), f_star(x, t))[1]
  sched = solvers.step_schedule(process, steps, 'karras')
  x_t = process.prior_sample(jax.random.PRNGKey(seed), (200, 8, 8, 1))
  sol = solvers.solve('consistency', counted, x_t, sched, jax.random.PRNGKey(seed + 1))
  assert int(sol.nfe) == steps == solvers.num_evaluations('consistency', steps)
  smin = _sig64(process, np.float32(process.t_min))
  x = np.asarray(sol.x0, np.float64).ravel()
  var = S ** 2 + smin ** 2
  n = x.size
  assert abs(x.mean() - MU) < 5 * np.sqrt(var / n), (x.mean(), seed)
  assert abs(x.var() - var) < 5 * var * np.sqrt(2.0 / n), (x.var(), var, seed)
  if steps == 1:
    want = f_star(x_t, jnp.ones((200,)))[0]
    np.testing.assert_allclose(np.asarray(sol.x0), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_the_consistency_sampler_is_refused_for_other_models():
  from diffusion_jax.sampling import config as sampler_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as e:
    sampler_lib.check_consistency(sampler_config.SamplerConfig('consistency', steps=1), None)
  oracles.assert_one_line_error(e.value, "'consistency'", 'distill.method')
  assert sampler_config.SamplerConfig('consistency', steps=3).num_evaluations(1000) == 3


# ------------------------------------------------------------------------------------------
# The spec.
# ------------------------------------------------------------------------------------------

def _digits_info():
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500, 'test': 297})


def _teacher_and_config(method='cd'):
  from configs import digits  # pylint: disable=g-import-not-at-top
  teacher = spec_lib.ExperimentSpec.from_config(digits.get_config(), _digits_info())
  config = digits.get_config()
  config.distill.teacher = '/tmp/teacher'
  config.distill.method = method
  config.diffusion.mean_type = 'v'
  if method == 'cd':
    config.eval.sampler, config.eval.sample_steps = 'consistency', 2
  return teacher, config


def test_a_student_spec_records_its_teacher_and_round_trips():
  teacher, config = _teacher_and_config()
  student = spec_lib.ExperimentSpec.from_config(config, _digits_info(), teacher=(teacher, 2600))
  assert student.distill.teacher_step == 2600
  assert student.distill.parsed_teacher_spec() == teacher
  assert student.consistency_sigma_data == 0.5 and teacher.consistency_sigma_data is None
  assert spec_lib.ExperimentSpec.from_json(student.to_json()) == student
  # The student's output type is its own (v here), the teacher's is in its spec (eps).
  assert student.parameterization.mean_type.value == 'v'
  assert student.distill.teacher_mean_type.value == 'eps'
  # A spec written before distillation compares equal to one without it.
  old = teacher.to_json()
  old.pop('distill')
  assert spec_lib.differences(old, teacher) == ([], [])
  # Another teacher checkpoint is a fixed difference: a resume refuses it.
  other = spec_lib.ExperimentSpec.from_config(config, _digits_info(), teacher=(teacher, 2000))
  fixed, _ = spec_lib.differences(student, other)
  assert [row[0] for row in fixed] == ['distill.teacher_step']


@pytest.mark.parametrize('change,fragment', [
    (lambda c: setattr(c.model, 'ch', 64), 'model.ch 32 -> 64'),
    (lambda c: setattr(c.diffusion, 'num_timesteps', 500), 'diffusion.num_timesteps'),
    (lambda c: setattr(c.diffusion, 'var_type', 'learned_range'), 'out_ch'),
    (lambda c: setattr(c.diffusion, 'mean_type', 'xprev'), "'xprev' has no denoiser to distil"),
    (lambda c: setattr(c.distill, 'start_steps', 6), 'power of 2'),
    (lambda c: setattr(c.distill, 'method', 'xx'), "unknown distill.method 'xx'"),
    (lambda c: setattr(c.distill, 'target_decay', 1.0), 'distill.target_decay'),
])
def test_a_student_that_cannot_be_its_teachers_is_one_line(change, fragment):
  teacher, config = _teacher_and_config()
  change(config)
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, _digits_info(), teacher=(teacher, 1))
  oracles.assert_one_line_error(e.value, fragment)


def test_pd_needs_the_vp_process_and_cd_teachers_are_refused():
  from configs import digits_ncsn  # pylint: disable=g-import-not-at-top
  info = _digits_info()
  ve = spec_lib.ExperimentSpec.from_config(digits_ncsn.get_config(), info)
  config = digits_ncsn.get_config()
  config.distill.teacher, config.distill.method = '/t', 'pd'
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, info, teacher=(ve, 1))
  oracles.assert_one_line_error(e.value, "'pd'", "'vp'")
  teacher, config = _teacher_and_config()
  cd_student = spec_lib.ExperimentSpec.from_config(config, info, teacher=(teacher, 1))
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, info, teacher=(cd_student, 1))
  oracles.assert_one_line_error(e.value, 'consistency model')
  # The consistency sampler on a non-consistency model's spec.
  _, config = _teacher_and_config('pd')
  config.eval.sampler, config.eval.sample_steps = 'consistency', 1
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, info, teacher=(teacher, 1))
  oracles.assert_one_line_error(e.value, "'consistency'", 'not one')


def test_the_recipes():
  """digits_cd/pd distil the default digits workdir; the CIFAR-10 ones the papers' settings."""
  from configs import digits_cd, digits_pd  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  info = _digits_info()
  teacher = spec_lib.ExperimentSpec.from_config(digits.get_config(), info)
  cd = spec_lib.ExperimentSpec.from_config(digits_cd.get_config(), info, teacher=(teacher, 2600))
  pd = spec_lib.ExperimentSpec.from_config(digits_pd.get_config(), info, teacher=(teacher, 2600))
  assert cd.distill.teacher == pd.distill.teacher == '/tmp/digits'
  assert cd.eval.sampler.kind.value == 'consistency'
  assert pd.eval.sampler.kind.value == 'ddim' and pd.eval.sampler.step_schedule.value == 'trailing'
  d = pd.distill
  assert d.num_rounds * d.steps_per_round == pd.run.num_train_steps
  assert pd.eval.sampler.steps == d.final_steps
  from configs import cifar10, cifar10_cd, cifar10_edm, cifar10_pd  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  cifar = input_pipeline.ImageDatasetInfo('cifar10', (32, 32, 3), 10, {'train': 50000})
  edm = spec_lib.ExperimentSpec.from_config(cifar10_edm.get_config(), cifar)
  cd = spec_lib.ExperimentSpec.from_config(cifar10_cd.get_config(), cifar, teacher=(edm, 1))
  c = cd.distill
  assert (c.num_levels, c.target_decay, c.distance.value) == (18, 0.0, 'pseudo_huber')
  assert (cd.training.batch_size, cd.optimizer.learning_rate, cd.training.ema_decay,
          cd.run.num_train_steps) == (512, 4e-4, 0.9999, 800_000)
  assert cd.optimizer.warmup_steps * 512 == pytest.approx(10e6, rel=1e-4)
  ddpm = spec_lib.ExperimentSpec.from_config(cifar10.get_config(), cifar)
  pd = spec_lib.ExperimentSpec.from_config(cifar10_pd.get_config(), cifar, teacher=(ddpm, 1))
  assert (pd.distill.start_steps, pd.distill.num_rounds, pd.distill.steps_per_round) == (
      256, 9, 50_000)
  assert (pd.optimizer.learning_rate, pd.training.batch_size) == (5e-5, 512)


# ------------------------------------------------------------------------------------------
# train.py and sample.py.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distil_sample_without_the_teacher_and_refuse_bad_teachers(child_env, trained_master,
                                                                   tmp_path):
  """cd from the trained tiny workdir: the student's workdir, copied elsewhere with the teacher
  gone, samples with one evaluation; bad teachers and the consistency sampler on the teacher
  are one line each, and a resume with another teacher is refused with nothing written."""
  import os, shutil, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  import workdirs  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  teacher = str(tmp_path / 'teacher')
  shutil.copytree(trained_master, teacher)
  student = str(tmp_path / 'student')
  run = lambda *args: subprocess.run([sys.executable, *args], env=child_env['env'], cwd=root,
                                     capture_output=True, text=True, timeout=900)
  cd = ['--config.training.sampler=consistency', '--config.training.sample_steps=1',
        '--config.eval.sampler=consistency', '--config.eval.sample_steps=1',
        '--config.training.num_train_steps=2']
  train = lambda workdir, teacher_path, *extra: run(*workdirs.train_cmd(
      child_env['data_dir'], workdir, f'--config.distill.teacher={teacher_path}', *cd,
      *extra)[1:])
  helpers.assert_ok(train(student, teacher))
  with open(os.path.join(student, 'spec.json')) as f:
    recorded = json.load(f)['distill']
  assert (recorded['method'], recorded['teacher'], recorded['teacher_step']) == ('cd', teacher, 8)
  moved = str(tmp_path / 'elsewhere')
  shutil.copytree(student, moved)
  shutil.move(teacher, teacher + '_gone')
  result = helpers.assert_ok(run(os.path.join(root, 'sample.py'), f'--workdir={moved}',
                                 '--num_samples=4'))
  assert 'consistency, 1 steps (karras), 1 model evaluations each' in result.stdout, result.stdout
  shutil.move(teacher + '_gone', teacher)
  # The consistency sampler on the teacher, a path that is no workdir, another teacher.
  helpers.assert_one_error_line(
      run(os.path.join(root, 'sample.py'), f'--workdir={teacher}', '--num_samples=4',
          '--sampler=consistency'), "'consistency'", 'not one')
  helpers.assert_one_error_line(train(str(tmp_path / 'x'), str(tmp_path / 'nothing')),
                                'is not a trained workdir')
  assert not os.path.exists(tmp_path / 'x' / 'spec.json')
  other = str(tmp_path / 'other_teacher')
  shutil.copytree(teacher, other)
  before = sorted(os.listdir(os.path.join(student, 'checkpoints')))
  helpers.assert_one_error_line(train(student, other, '--config.training.num_train_steps=4'),
                                'distill.teacher')
  assert sorted(os.listdir(os.path.join(student, 'checkpoints'))) == before


@pytest.mark.slow
def test_a_pd_run_resumed_mid_round_and_across_a_round_is_the_unbroken_run(child_env,
                                                                           trained_master,
                                                                           tmp_path):
  """pd, 2 steps per round from 4 student steps: 4 steps straight against 3 then resumed
  (the resume lands mid-round, the next step ends the round and switches the teacher): the
  checkpoints at step 4 are equal bit for bit, teacher params included."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  import workdirs  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  pd = [f'--config.distill.teacher={trained_master}', '--config.distill.method=pd',
        '--config.distill.start_steps=4', '--config.distill.steps_per_round=2',
        '--config.training.checkpoint_every_steps=1', '--config.training.log_every_steps=1',
        '--config.training.keep_checkpoints=10', '--config.eval.sampler=ddim',
        '--config.eval.sample_steps=1', '--config.eval.step_schedule=trailing']
  run = lambda workdir, steps: helpers.assert_ok(subprocess.run(
      workdirs.train_cmd(child_env['data_dir'], workdir, *pd,
                         f'--config.training.num_train_steps={steps}'),
      env=child_env['env'], cwd=root, capture_output=True, text=True, timeout=900))
  straight, broken = str(tmp_path / 'straight'), str(tmp_path / 'broken')
  run(straight, 4)
  run(broken, 3)
  run(broken, 4)
  workdirs.assert_same_checkpoint(straight, broken, 4)
  state, _ = workdirs.restore_checkpoint(straight, 4)
  before, _ = workdirs.restore_checkpoint(straight, 3)
  # Step 4 ended round 1: its teacher is the round's student EMA, unlike step 3's.
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert all(np.array_equal(a, b) for a, b in zip(leaves(state['state']['teacher_params']),
                                                  leaves(state['ema'])))
  assert not all(np.array_equal(a, b) for a, b in zip(
      leaves(before['state']['teacher_params']), leaves(state['state']['teacher_params'])))
