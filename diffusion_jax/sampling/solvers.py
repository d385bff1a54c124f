"""Every sampler, one signature and one registry: Ho's ancestral chain (`ddpm`) and DDIM
beside the solvers of the probability-flow ODE and the reverse SDE, k-diffusion style.

Each solver is a small function `solver(denoiser, x_T, schedule, rng, **options) -> x_end`
of a `denoiser(x, t [B]) -> (x0_hat, eps_hat)` (`continuous.make_denoiser`), the noise x_T
`[B, ...]` and a `StepSchedule` (continuous times t_0 = 1 > t_1 > … > t_N = 1/T), and
returns the state x at t_N. The fixed-step solvers are one `lax.scan` (one compile, jit-safe);
step i draws its noise from `fold_in(rng, i)`.

The sample (one convention for every solver): `solve` returns x₀ = x̂₀(x_{t_N}, t_N), the
denoiser's prediction at the last time ("denoise to zero": what k-diffusion's final step to
σ = 0 computes, and Tweedie's denoising step of Song et al.). It costs one evaluation, counted
in `num_evaluations`.

Processes: every solver takes any `continuous.Process` (VP, VE, sub-VP); α and σ follow from
λ by the process's own `log_alpha_of_lambda` / `log_sigma_of_lambda`. `annealed_langevin`
(NCSN's sampler) is defined for VE only.

The discrete chains are steps between two levels t > s of the same process: `ddpm` draws from
the posterior q(x_s | x_t, x̂₀) (for VE it is score_sde's ancestral predictor), `ddim` moves
along it deterministically (η = 0: first-order DPM-Solver++) or adds η² of its variance. Their
coefficients are computed once on the host in float64 from the schedule, which must then be
concrete (built outside `jit` and closed over). On a VP process of T steps their default
schedule is 'respaced': the levels sit on DDPM's integer timesteps (`space_timesteps`), where
the model sees its own timesteps, so they reproduce Ho's and Song's chains to float32 rounding.

A new sampler is one function here and one entry in `SOLVERS`: `SamplerConfig`, the command
line flags and the spec's checks read the registry.

Orders: the interpolated α(t) has a kink at every node 1/T, so no solver integrates in raw t.
Euler and Heun (Karras et al. 2022) work in σ̃ = σ/α = e^{−λ} on x̃ = x/α, where the PF-ODE is
dx̃/dσ̃ = ε̂; DPM-Solver++ (Lu et al. 2022) and the adaptive solve work in λ. The SDE samplers
take their coefficients from the exact α at the step ends.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.options import Option
from diffusion_jax.process.continuous import Denoiser, Process, ProcessKind
from diffusion_jax.process.gaussian_diffusion import Array, VarType
from diffusion_jax.process.respacing import space_timesteps


class ScheduleKind(Option):
  TIME_UNIFORM = 'time_uniform'  # uniform in t
  LOGSNR = 'logsnr'              # uniform in λ (half the log-SNR)
  KARRAS = 'karras'              # Karras et al. 2022, ρ = 7, in σ̃ = e^{−λ}
  RESPACED = 'respaced'          # DDPM's own levels, `space_timesteps(T, N + 1)` (VP of T steps)
  TRAILING = 'trailing'          # K levels t_j = 1 − j/K (diffusers' 'trailing'; PD's grid)

  @classmethod
  def _what(cls):
    return 'step_schedule'


# ------------------------------------------------------------------------------------------
# Step schedules.
# ------------------------------------------------------------------------------------------


@flax.struct.dataclass
class StepSchedule:
  """The process and the N + 1 decreasing times t_0 = 1 > … > t_N = t_min of a solve."""
  process: Process
  t: Array  # [N + 1]

  @property
  def num_steps(self) -> int:
    return self.t.shape[0] - 1

  @property
  def lam(self) -> Array:
    return self.process.lam(self.t)


def step_schedule(process: Process, num_steps: int, kind: str | ScheduleKind = 'logsnr', *,
                  rho: float = 7.0) -> StepSchedule:
  """`num_steps` steps from t = 1 down to t = t_min (1/T for VP), spaced as `kind` says.

  For VE, 'logsnr' steps are geometric in σ (NCSN's levels)."""
  kind = ScheduleKind.parse(kind)
  big_t = process.num_timesteps  # None: a process of continuous time
  if kind is ScheduleKind.RESPACED:
    big_t = None if big_t is None else big_t - 1  # N + 1 levels out of T
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or num_steps < 1 or (big_t is not None and num_steps > big_t)):
    bound = f'[1, {big_t}]' if big_t is not None else '[1, ∞)'
    raise ValueError(f'steps must be an integer in {bound}, got {num_steps!r}')
  if kind is ScheduleKind.RESPACED:
    return _respaced(process, num_steps + 1)
  if kind is ScheduleKind.TRAILING:
    return _trailing(process, num_steps + 1)
  u = jnp.linspace(0.0, 1.0, num_steps + 1)  # [N + 1]
  t_max, t_min = jnp.asarray(process.t_max), jnp.asarray(process.t_min)
  if kind is ScheduleKind.TIME_UNIFORM:
    t = t_max + u * (t_min - t_max)
  else:
    lam_lo, lam_hi = process.lam(t_max), process.lam(t_min)
    if kind is ScheduleKind.LOGSNR:
      lam = lam_lo + u * (lam_hi - lam_lo)
    else:
      s_max, s_min = jnp.exp(-lam_lo), jnp.exp(-lam_hi)
      s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
      lam = -jnp.log(s)
    t = process.t_of_lambda(lam)
  t = t.at[0].set(t_max).at[-1].set(t_min)
  return StepSchedule(process=process, t=t)


def _respaced(process: Process, num_levels: int) -> StepSchedule:
  """The levels t_n = (n + 1)/T of a VP process at `space_timesteps(T, num_levels)`, T−1 first."""
  if process.kind is not ProcessKind.VP or process.num_timesteps is None:
    raise ValueError("step_schedule 'respaced' places the steps on DDPM's integer timesteps: "
                     f"it needs the 'vp' process, not {process.kind.value!r}")
  taus = space_timesteps(process.num_timesteps, num_levels)
  t = np.asarray(process.t_nodes)[taus[::-1]]  # the nodes' own float32 values, on the host
  return StepSchedule(process=process, t=jnp.asarray(t))


def _trailing(process: Process, num_levels: int) -> StepSchedule:
  """K = `num_levels` levels t_j = t_max (1 − j/K), j = 0 … K−1: the top K of a uniform grid
  that ends at t = 0 (diffusers' 'trailing' spacing; progressive distillation's student grid,
  nested as K doubles). For a VP process of T steps (t_max = 1) with K | T they are DDPM's
  nodes T−1, T−1−T/K, …; on the 'flow' process ddim over them is Euler in t, the last step
  (solve's x̂₀) landing on t = 0: rectified flow's K-step sampler."""
  t = float(process.t_max) * (1.0 - np.arange(num_levels, dtype=np.float64) / num_levels)
  if t[-1] < process.t_min - 1e-12:
    raise ValueError(f"step_schedule 'trailing' with {num_levels} levels goes below the "
                     f'process\'s lowest time {process.t_min:g}: use at most '
                     f'{int(round(process.t_max / process.t_min))} levels')
  with jax.ensure_compile_time_eval():
    return StepSchedule(process=process, t=jnp.asarray(t, jnp.float32))


def level_schedule(process: Process, num_levels: int, kind: str | ScheduleKind = 'respaced'
                   ) -> StepSchedule:
  """`num_levels` decreasing levels from t = 1 (N = num_levels − 1 steps): the schedule of the
  discrete chains, whose `steps` count the levels the model sees. One level is t = 1 alone
  (the sample is then x̂₀ of the prior draw)."""
  if (isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer))
      or num_levels < 1):
    raise ValueError(f'steps must be a positive integer, got {num_levels!r}')
  kind = ScheduleKind.parse(kind)
  if kind is ScheduleKind.RESPACED:
    if process.num_timesteps is not None and num_levels > process.num_timesteps:
      raise ValueError(f'steps must be an integer in [1, {process.num_timesteps}], got '
                       f'{num_levels!r}')
    return _respaced(process, num_levels)
  if kind is ScheduleKind.TRAILING:
    return _trailing(process, num_levels)
  if num_levels == 1:
    return StepSchedule(process=process, t=jnp.asarray([process.t_max], jnp.float32))
  return step_schedule(process, num_levels - 1, kind)


def schedule_from_times(process: Process, t) -> StepSchedule:
  """A custom schedule: times `[N + 1]` within [t_min, 1], decreasing (or, for a deterministic
  solver run upwards, increasing: `ddim` encodes that way)."""
  t = jnp.asarray(t)
  chex.assert_rank(t, 1)
  if t.shape[0] < 2:
    raise ValueError(f'a schedule needs at least 2 times, got {t.shape[0]}')
  return StepSchedule(process=process, t=t)


# ------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------


def _bt(t: Array, x: Array) -> Array:
  """A scalar time as `[B]`."""
  return jnp.full((x.shape[0],), t, dtype=x.dtype)


def _log_alphas(sched: StepSchedule) -> Array:
  return sched.process.log_alpha_t(sched.t)


def _need_rng(rng, name):
  if rng is None:
    raise ValueError(f'solver {name!r} draws noise and needs an rng key, got None')


# A one-step solver as a function of the step: `step(x, i, key) -> x` at t_{i+1} from x at t_i,
# drawing its noise (if any) from `key`. `SolverInfo.stepper` builds it from (denoiser, sched,
# **options); the solver is `_run_steps` of it, and `sampling.controllable` runs it over its own
# sequence of levels (inpainting's replacement after every step, RePaint's jumps back).
Step = Callable[[Array, Array, Any], Array]


def fold_key(rng: Array, sched: 'StepSchedule', i: Array) -> Array:
  """Step i's key: `fold_in(rng, i)` (every solver but the discrete chains)."""
  del sched
  return jax.random.fold_in(rng, i)


def _run_steps(step: Step, x: Array, sched: 'StepSchedule', rng, key_of=fold_key) -> Array:
  """The N steps of `step` in one `lax.scan`; step i's key is `key_of(rng, sched, i)`."""
  def body(x, i):
    return step(x, i, None if rng is None else key_of(rng, sched, i)), None

  x, _ = jax.lax.scan(body, x, jnp.arange(sched.num_steps))
  return x


# ------------------------------------------------------------------------------------------
# Karras et al. 2022, Alg. 1 and 2: the PF-ODE dx̃/dσ̃ = ε̂ on x̃ = x/α, σ̃ = e^{−λ}.
# ------------------------------------------------------------------------------------------


def euler_step(denoiser: Denoiser, sched: StepSchedule) -> Step:
  """`euler`'s step i (1 evaluation)."""
  la = _log_alphas(sched)
  st = jnp.exp(-sched.lam)  # σ̃ [N + 1]

  def step(x, i, key):
    del key
    _, eps = denoiser(x, _bt(sched.t[i], x))
    y = x * jnp.exp(-la[i]) + (st[i + 1] - st[i]) * eps
    return y * jnp.exp(la[i + 1])
  return step


def euler(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None) -> Array:
  """Euler steps in σ̃ (N evaluations); returns x at t_N."""
  return _run_steps(euler_step(denoiser, sched), x, sched, None)


def heun(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
         s_noise: float = 1.0) -> Array:
  """Heun's 2nd-order steps in σ̃ (2N evaluations), with Karras' churn when `s_churn` > 0.

  Churn raises σ̃_i to σ̂ = σ̃_i(1 + γ), γ = min(S_churn/N, √2 − 1) for σ̃_i in
  [S_tmin, S_tmax], by adding noise of variance σ̂² − σ̃_i² to x̃ (σ̂ is capped at σ̃(t=1)).
  """
  if s_churn > 0:
    _need_rng(rng, 'heun (with churn)')
  step = heun_step(denoiser, sched, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                   s_noise=s_noise)
  return _run_steps(step, x, sched, rng if s_churn > 0 else None)


def heun_step(denoiser: Denoiser, sched: StepSchedule, *, s_churn: float = 0.0,
              s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> Step:
  """`heun`'s step i (2 evaluations; churn draws from the step's key)."""
  churn = s_churn > 0
  n = sched.num_steps
  process = sched.process
  lam = sched.lam
  la = _log_alphas(sched)
  st = jnp.exp(-lam)
  gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)

  def step(x, i, key):
    y = x * jnp.exp(-la[i])
    st_hat, t_hat = st[i], sched.t[i]
    if churn:
      in_range = (st[i] >= s_tmin) & (st[i] <= s_tmax)
      st_hat = jnp.minimum(st[i] * (1.0 + jnp.where(in_range, gamma_max, 0.0)), st[0])
      noise = jax.random.normal(key, x.shape, x.dtype)
      y = y + jnp.sqrt(jnp.maximum(st_hat ** 2 - st[i] ** 2, 0.0)) * s_noise * noise
      t_hat = jnp.where(st_hat > st[i], process.t_of_lambda(-jnp.log(st_hat)), sched.t[i])
    a_hat = jnp.exp(process.log_alpha_of_lambda(-jnp.log(st_hat)))
    _, d = denoiser(a_hat * y, _bt(t_hat, x))
    y_pred = y + (st[i + 1] - st_hat) * d
    a_next = jnp.exp(la[i + 1])
    _, d_next = denoiser(a_next * y_pred, _bt(sched.t[i + 1], x))
    y_next = y + (st[i + 1] - st_hat) * 0.5 * (d + d_next)
    return a_next * y_next
  return step


# ------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022): multistep exponential integrators of the data prediction.
#   x_{i+1} = (σ_{i+1}/σ_i) x_i + σ_{i+1} ∫_{λ_i}^{λ_{i+1}} e^λ x̂₀(λ) dλ
# ------------------------------------------------------------------------------------------


def _multistep_orders(n: int, order: int, lower_order_final: bool) -> np.ndarray:
  """The order of each of the n steps: warm-up from 1, and (DPM-Solver's rule) lowered on the
  final steps when `lower_order_final` and n < 10."""
  i = np.arange(n)
  orders = np.minimum(order, i + 1)
  if lower_order_final and n < 10:
    orders = np.minimum(orders, n - i)
  return orders


def _dpmpp(denoiser, x, sched, order, lower_order_final):
  n = sched.num_steps
  lam = sched.lam
  log_sig = sched.process.log_sigma_of_lambda(lam)
  alpha = jnp.exp(sched.process.log_alpha_of_lambda(lam))
  orders = jnp.asarray(_multistep_orders(n, order, lower_order_final))

  def step(carry, i):
    x, m1, m2, h1, h2 = carry  # x̂₀ at steps i−1, i−2; h1 = λ_i − λ_{i−1}, h2 = λ_{i−1} − λ_{i−2}
    m0, _ = denoiser(x, _bt(sched.t[i], x))
    h = lam[i + 1] - lam[i]
    i0 = -jnp.expm1(-h)             # ∫₀ʰ e^{u−h} du
    i1 = 1.0 - i0 / h               # ∫₀ʰ (u/h) e^{u−h} du
    i2 = 1.0 - 2.0 * i1 / h         # ∫₀ʰ (u/h)² e^{u−h} du
    r0 = h1 / h
    r1 = h2 / h
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    # Order 1 (DDIM), order 2 (the paper's 2M: D = (1 + 1/(2r)) m0 − 1/(2r) m1), order 3
    # (the exact integral of the quadratic through the last three predictions).
    p1 = i0 * m0
    p2 = i0 * (m0 + 0.5 * d1_0)
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    p3 = i0 * m0 + i1 * d1 + i2 * d2
    k = orders[i]
    pred = jnp.where(k == 1, p1, jnp.where(k == 2, p2, p3))
    x_next = jnp.exp(log_sig[i + 1] - log_sig[i]) * x + alpha[i + 1] * pred
    return (x_next, m0, m1, h, h1), None

  one = jnp.ones((), x.dtype)
  carry = (x, jnp.zeros_like(x), jnp.zeros_like(x), one, one)
  (x, *_), _ = jax.lax.scan(step, carry, jnp.arange(n))
  return x


def dpmpp_2m(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
             lower_order_final: bool = True) -> Array:
  """DPM-Solver++(2M), N evaluations; returns x at t_N."""
  del rng
  return _dpmpp(denoiser, x, sched, 2, lower_order_final)


def dpmpp_3m(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
             lower_order_final: bool = True) -> Array:
  """DPM-Solver++(3M), N evaluations; returns x at t_N."""
  del rng
  return _dpmpp(denoiser, x, sched, 3, lower_order_final)


# ------------------------------------------------------------------------------------------
# The reverse SDE (Song et al. 2021).
# ------------------------------------------------------------------------------------------


def _step_f_g2(sched: StepSchedule, la: Array, sig: Array, i) -> tuple[Array, Array, Array]:
  """(dt < 0, f, g²) of step i as averages over the step: f = Δ log α/Δt exactly, and
  g² = dσ²/dt − 2fσ² as Δσ²/Δt − 2f·mean(σ²) (for VP, g² = −2f exactly; for VE, f = 0 and
  g² Δt = σ²_{i+1} − σ²_i, NCSN's reverse-diffusion step)."""
  dt = sched.t[i + 1] - sched.t[i]
  f = (la[i + 1] - la[i]) / dt
  if sched.process.kind is ProcessKind.VP:
    return dt, f, -2.0 * f
  s0, s1 = jnp.square(sig[i]), jnp.square(sig[i + 1])
  return dt, f, (s1 - s0) / dt - f * (s0 + s1)


def _em_step(x, score, z, dt, f, g2):
  return x + (f * x - g2 * score) * dt + jnp.sqrt(jnp.maximum(g2 * -dt, 0.0)) * z


def euler_maruyama(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None) -> Array:
  """Euler–Maruyama on dx = [f x − g² s] dt + g dw̄ (N evaluations); returns x at t_N.

  f and g² are the step's averages (`_step_f_g2`).
  """
  _need_rng(rng, 'sde')
  return _run_steps(euler_maruyama_step(denoiser, sched), x, sched, rng)


def euler_maruyama_step(denoiser: Denoiser, sched: StepSchedule) -> Step:
  """`euler_maruyama`'s step i (1 evaluation)."""
  la = _log_alphas(sched)
  sig = jnp.exp(sched.process.log_sigma_of_lambda(sched.lam))

  def step(x, i, key):
    dt, f, g2 = _step_f_g2(sched, la, sig, i)
    _, eps = denoiser(x, _bt(sched.t[i], x))
    score = -eps / sig[i]
    z = jax.random.normal(key, x.shape, x.dtype)
    return _em_step(x, score, z, dt, f, g2)
  return step


def _per_example_norm(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))  # [B]


def predictor_corrector(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
                        snr: float = 0.16, corrector_steps: int = 1) -> Array:
  """Song et al. 2021 Alg. 5 (VP) and 4 (VE): at each t_i, `corrector_steps` Langevin steps
  at target `snr`, then one predictor step to t_{i+1}; N·(1 + corrector_steps) evaluations.

  With β_i = 1 − (α_i/α_{i+1})² (the discrete step from t_{i+1} to t_i; 0 for VE):
    corrector: ε_L = 2(1 − β_i)(snr·mean‖z‖/mean‖s‖)², x ← x + ε_L s + √(2ε_L) z;
    predictor (VP): the ancestral x ← (x + β_i s)/√(1 − β_i) + √β_i z;
    predictor (VE, sub-VP): the reverse-diffusion (Euler–Maruyama) step of `euler_maruyama`,
      for VE x ← x + (σ_i² − σ_{i+1}²) s + √(σ_i² − σ_{i+1}²) z.
  As in Song et al.'s code, the norms are per example and averaged over the batch, so one
  step size serves the batch (per-example ratios are erratic for small inputs).
  """
  _need_rng(rng, 'pc')
  step = predictor_corrector_step(denoiser, sched, snr=snr, corrector_steps=corrector_steps)
  return _run_steps(step, x, sched, rng)


def predictor_corrector_step(denoiser: Denoiser, sched: StepSchedule, *, snr: float = 0.16,
                             corrector_steps: int = 1) -> Step:
  """`predictor_corrector`'s step i (1 + `corrector_steps` evaluations)."""
  la = _log_alphas(sched)
  sig = jnp.exp(sched.process.log_sigma_of_lambda(sched.lam))
  ancestral = sched.process.kind is ProcessKind.VP

  def score(x, i):
    _, eps = denoiser(x, _bt(sched.t[i], x))
    return -eps / sig[i]

  def step(x, i, key):
    beta = -jnp.expm1(2.0 * (la[i] - la[i + 1]))
    for k in range(corrector_steps):
      s = score(x, i)
      z = jax.random.normal(jax.random.fold_in(key, k + 1), x.shape, x.dtype)
      ratio = snr * jnp.mean(_per_example_norm(z)) / jnp.mean(_per_example_norm(s))
      eps_l = 2.0 * (1.0 - beta) * jnp.square(ratio)
      x = x + eps_l * s + jnp.sqrt(2.0 * eps_l) * z
    s = score(x, i)
    z = jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype)
    if ancestral:
      x = (x + beta * s) * jnp.exp(la[i + 1] - la[i]) + jnp.sqrt(beta) * z
    else:
      x = _em_step(x, s, z, *_step_f_g2(sched, la, sig, i))
    return x
  return step


# ------------------------------------------------------------------------------------------
# Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1), NCSN's sampler.
# ------------------------------------------------------------------------------------------


def annealed_langevin(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
                      steps_per_level: int = 100, step_size: float = 2e-5) -> Array:
  """Langevin steps at the N + 1 noise levels σ_i = σ(t_i) of the schedule (largest first),
  `steps_per_level` (T) at each, with step α_i = ε·σ_i²/σ_L² (ε = `step_size`, σ_L the last
  level):  x ← x + ½α_i s(x, σ_i) + √α_i z.  (N + 1)·T evaluations in one `lax.scan`;
  returns x after the last level (`solve` adds Tweedie's x + σ_L² s as its x₀).

  For the 've' and 'edm' processes only: the levels perturb x₀ without scaling it (α = 1).
  """
  _need_rng(rng, 'ald')
  if sched.process.kind not in (ProcessKind.VE, ProcessKind.EDM):
    raise ValueError("solver 'ald' (annealed Langevin dynamics) is defined for the 've' and "
                     f"'edm' processes only, not {sched.process.kind.value!r}: use sde, pc or "
                     'ode')
  if isinstance(steps_per_level, bool) or int(steps_per_level) != steps_per_level \
      or steps_per_level < 1:
    raise ValueError(f'ald steps_per_level must be a positive integer, got {steps_per_level!r}')
  if not step_size > 0:
    raise ValueError(f'ald step_size must be > 0, got {step_size!r}')
  sig = jnp.exp(sched.process.log_sigma_t(sched.t))  # [L]
  alphas = step_size * jnp.square(sig / sig[-1])      # [L]

  def step(x, k):
    i = k // steps_per_level
    _, eps = denoiser(x, _bt(sched.t[i], x))
    z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
    return x + 0.5 * alphas[i] * (-eps / sig[i]) + jnp.sqrt(alphas[i]) * z, None

  x, _ = jax.lax.scan(step, x, jnp.arange((sched.num_steps + 1) * steps_per_level))
  return x


# ------------------------------------------------------------------------------------------
# The adaptive PF-ODE solve: dx/dλ = α (x̂₀ − α x), with diffrax.
# ------------------------------------------------------------------------------------------


def pf_ode_lambda_field(denoiser: Denoiser, process: Process):
  """The PF-ODE in λ: `field(λ, x) -> dx/dλ = α x̂₀(x, t(λ)) + (d log σ/dλ) x`.

  (Differentiate x_λ = (σ_λ/σ_s) x_s + σ_λ ∫ e^λ x̂₀ dλ.) For VP d log σ/dλ = −α², so this is
  α(x̂₀ − αx); for VE it is x̂₀ − x."""
  def field(lam, x):
    alpha = jnp.exp(process.log_alpha_of_lambda(lam)).astype(x.dtype)
    kappa = process.dlog_sigma_dlambda(lam).astype(x.dtype)
    x0, _ = denoiser(x, _bt(process.t_of_lambda(lam), x))
    return alpha * x0 + kappa * x
  return field


def _diffrax_solver(name: str):
  import diffrax  # pylint: disable=g-import-not-at-top
  solvers = {'tsit5': diffrax.Tsit5, 'dopri5': diffrax.Dopri5, 'dopri8': diffrax.Dopri8,
             'heun': diffrax.Heun, 'bosh3': diffrax.Bosh3}
  if name not in solvers:
    raise ValueError(f'unknown ode method {name!r}; allowed: {", ".join(solvers)}')
  return solvers[name]()


def diffrax_nfe(stats: dict[str, Any], method: str = 'tsit5') -> Array:
  """Vector-field evaluations of a diffrax solve (dt0=None, FSAL explicit RK methods):
  (stages − 1) per attempted step plus 1 (counted against a callback in the tests)."""
  new_per_step = {'tsit5': 6, 'dopri5': 6, 'dopri8': 12, 'heun': 1, 'bosh3': 3}[method]
  return new_per_step * stats['num_steps'] + 1


def ode_adaptive(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
                 rtol: float = 1e-4, atol: float | None = None, method: str = 'tsit5',
                 max_steps: int = 4096) -> tuple[Array, Array]:
  """The PF-ODE from λ(t_0) to λ(t_N) with adaptive steps (a PID controller).

  Only the schedule's ends are used; `atol` defaults to `rtol`. Returns (x at t_N, vector-field
  evaluations int32 []).
  """
  del rng
  atol = rtol if atol is None else atol
  import diffrax  # pylint: disable=g-import-not-at-top
  field = pf_ode_lambda_field(denoiser, sched.process)
  lam = sched.lam
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda l, y, args: field(l, y)), _diffrax_solver(method),
      t0=lam[0], t1=lam[-1], dt0=None, y0=x,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  return sol.ys[-1], jnp.asarray(diffrax_nfe(sol.stats, method), jnp.int32)


# ------------------------------------------------------------------------------------------
# The discrete chains (Ho et al. 2020; Song et al. 2021, DDIM) as steps between two levels.
#   With h = λ_s − λ_t > 0 between the level t and the next, s, the posterior q(x_s | x_t, x₀):
#     mean = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) x₀,   variance β̃ = σ_s² (1 − e^{−2h}),
#   and the forward step's variance β = σ_t² (1 − e^{−2h}) (= 1 − ᾱ_t/ᾱ_s for VP).
# ------------------------------------------------------------------------------------------


def _host_levels(sched: StepSchedule) -> tuple[np.ndarray, np.ndarray]:
  """float64 (log α, log σ) `[N + 1]` at the schedule's levels, computed on the host."""
  if isinstance(sched.t, jax.core.Tracer):
    raise ValueError('ddpm and ddim compute their coefficients on the host: build the schedule '
                     'outside jit and close over it, rather than passing it as a traced argument')
  process = sched.process
  if process.kind is ProcessKind.VP:
    # NumPy, not eager jnp (no small programs to compile): log α interpolated between the
    # nodes as `VPProcess.log_alpha_t` does (exact at a node), σ from α² + σ² = 1.
    nodes = np.asarray(process.t_nodes, np.float64)
    t = np.clip(np.asarray(sched.t, np.float64), nodes[0], nodes[-1])
    la = np.interp(t, nodes, np.asarray(process.log_alpha, np.float64))
    return la, 0.5 * np.log(-np.expm1(2.0 * la))
  with jax.ensure_compile_time_eval():
    la = np.asarray(process.log_alpha_t(sched.t), np.float64)
    ls = np.asarray(process.log_sigma_t(sched.t), np.float64)
  return la, ls


@dataclasses.dataclass(frozen=True)
class PairCoefficients:
  """Each step's coefficients, float64 `[N]` (from level i to level i + 1)."""
  x: np.ndarray          # (σ_s/σ_t) e^{−h}: the posterior mean's weight on x_t
  x0: np.ndarray         # α_s (1 − e^{−2h}): its weight on x̂₀
  alpha_s: np.ndarray    # α_s
  sigma_s: np.ndarray    # σ_s
  small: np.ndarray      # β̃, the posterior variance (Ho's fixed-small)
  large: np.ndarray      # β, the forward step's variance (Ho's fixed-large)


def pair_coefficients(sched: StepSchedule) -> PairCoefficients:
  """The posterior's coefficients for every pair of adjacent levels, in float64 on the host."""
  la, ls = _host_levels(sched)
  lam = la - ls
  h = lam[1:] - lam[:-1]
  one_minus = -np.expm1(-2.0 * h)   # 1 − e^{−2h}
  return PairCoefficients(x=np.exp(ls[1:] - ls[:-1] - h), x0=np.exp(la[1:]) * one_minus,
                          alpha_s=np.exp(la[1:]), sigma_s=np.exp(ls[1:]),
                          small=np.exp(2.0 * ls[1:]) * one_minus,
                          large=np.exp(2.0 * ls[:-1]) * one_minus)


def _f32(a: np.ndarray) -> Array:
  return jnp.asarray(a, jnp.float32)


def chain_key(rng: Array, sched: StepSchedule, i: Array) -> Array:
  """Step i's key: Ho's chain numbers its steps by the level they leave, N − i (so the same
  seed gives the same samples as the chains over a respaced process always did)."""
  return jax.random.fold_in(rng, sched.num_steps - i)


def ddpm(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
         variance: str | VarType = 'fixedsmall') -> Array:
  """Ancestral sampling (Ho et al. 2020, Alg. 2): x_s ~ N(posterior mean(x_t, x̂₀), Σ) at each
  of the N steps (N evaluations; `solve`'s final x̂₀ is the chain's last, noiseless step).

  `variance`: 'fixedsmall' (β̃), 'fixedlarge' (β), 'learned' (log Σ is the model's variance
  output) or 'learned_range' (log Σ = f log β + (1 − f) log β̃, f = (v + 1)/2). The learned ones
  need a denoiser that returns the variance output third (`make_denoiser(with_variance=True)`).
  """
  _need_rng(rng, 'ddpm')
  if sched.num_steps == 0:   # one level: the sample is `solve`'s x̂₀ of x
    return x
  return _run_steps(ddpm_step(denoiser, sched, variance=variance), x, sched, rng, chain_key)


def ddpm_step(denoiser: Denoiser, sched: StepSchedule, *,
              variance: str | VarType = 'fixedsmall') -> Step:
  """`ddpm`'s step i (1 evaluation): a draw from the posterior between levels i and i + 1."""
  var = VarType.parse(variance)
  c = pair_coefficients(sched)
  c_x, c_x0 = _f32(c.x), _f32(c.x0)
  log_small, log_large = _f32(np.log(c.small)), _f32(np.log(c.large))

  def step(x, i, key):
    out = denoiser(x, _bt(sched.t[i], x))
    mean = c_x0[i] * out[0] + c_x[i] * x
    if var is VarType.FIXED_SMALL:
      log_var = log_small[i]
    elif var is VarType.FIXED_LARGE:
      log_var = log_large[i]
    elif var is VarType.LEARNED:
      log_var = out[2]
    else:
      frac = (out[2] + 1.0) / 2.0
      log_var = frac * log_large[i] + (1.0 - frac) * log_small[i]
    z = jax.random.normal(key, x.shape, x.dtype)
    return mean + jnp.exp(0.5 * log_var) * z
  return step


def ddim(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None, *,
         eta: float = 0.0) -> Array:
  """DDIM (Song et al. 2021): x_s = α_s x̂₀ + √(σ_s² − η²β̃) ε̂ + η√β̃ z (N evaluations).

  η = 0 is deterministic, first-order DPM-Solver++ in λ, and runs in either direction: over
  increasing levels it is the DDIM encoder. η = 1 is the ancestral chain with fixed-small
  variance, written through ε̂.
  """
  if eta < 0:
    raise ValueError(f'ddim eta must be >= 0, got {eta!r}')
  if eta:
    _need_rng(rng, 'ddim (eta > 0)')
  if sched.num_steps == 0:   # one level: the sample is `solve`'s x̂₀ of x
    return x
  return _run_steps(ddim_step(denoiser, sched, eta=eta), x, sched, rng if eta else None,
                    chain_key)


def ddim_step(denoiser: Denoiser, sched: StepSchedule, *, eta: float = 0.0) -> Step:
  """`ddim`'s step i (1 evaluation; η > 0 draws from the step's key)."""
  if eta < 0:
    raise ValueError(f'ddim eta must be >= 0, got {eta!r}')
  c = pair_coefficients(sched)
  var = eta ** 2 * c.small if eta else np.zeros_like(c.small)
  c_x0 = _f32(c.alpha_s)
  c_eps = _f32(np.sqrt(np.maximum(np.square(c.sigma_s) - var, 0.0)))
  c_z = _f32(np.sqrt(var))

  def step(x, i, key):
    x0, eps = denoiser(x, _bt(sched.t[i], x))[:2]
    x_next = c_x0[i] * x0 + c_eps[i] * eps
    if eta:
      x_next = x_next + c_z[i] * jax.random.normal(key, x.shape, x.dtype)
    return x_next
  return step


# ------------------------------------------------------------------------------------------
# Consistency models (Song et al. 2023, Algorithm 1): denoise, re-noise to the next level.
# ------------------------------------------------------------------------------------------


def consistency(denoiser: Denoiser, x: Array, sched: StepSchedule, rng=None) -> Array:
  """The multistep consistency sampler: N evaluations for a schedule of N steps.

  At each of t_0 … t_{N−1} the model's x̂₀ = f(x, t_i) is taken, and (but after the last) put
  back at the next level as x̃ = x̂₀ + √(σ̃_{i+1}² − σ̃_N²)·z, x = α_{i+1} x̃, where σ̃_N = σ̃(t_N)
  is the schedule's lowest level, the consistency function's σ_min. Its default levels are the
  'karras' ones, t_N = t_min: one step is f(x_T, 1), two steps re-noise once to σ̃_1 of a
  two-step Karras schedule (ρ = 7). Returns the last x̂₀, the sample itself
  (`SolverInfo.final_denoise` False: no extra evaluation at t_N).
  """
  n = sched.num_steps
  if n > 1:
    _need_rng(rng, 'consistency (more than one step)')
  la = _log_alphas(sched)
  st = jnp.exp(-sched.lam)   # σ̃ at the N + 1 times

  def step(x, i):
    x0, _ = denoiser(x, _bt(sched.t[i], x))
    scale = jnp.sqrt(jnp.maximum(st[i + 1] ** 2 - st[n] ** 2, 0.0))
    z = (jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) if n > 1
         else jnp.zeros_like(x))
    return jnp.exp(la[i + 1]) * (x0 + scale * z), x0

  _, x0s = jax.lax.scan(step, x, jnp.arange(n))
  return x0s[-1]


# ------------------------------------------------------------------------------------------
# The one dispatch point.
# ------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Solution:
  x0: Array       # [B, ...] the sample: x̂₀(x_end, t_N)
  x_end: Array    # [B, ...] the solver's state at t_N
  nfe: Array      # int32 [] model evaluations, the final denoising included


@dataclasses.dataclass(frozen=True)
class SolverInfo:
  """A registry entry: what `SamplerConfig`, the flags and the spec need to know of a solver."""
  fn: Callable
  summary: str                               # for --sampler's help
  options: Mapping[str, str] = dataclasses.field(default_factory=dict)  # config field → kwarg
  evaluations_per_step: int | None = 1       # None: adaptive (reports its own)
  levels: bool = False       # `steps` counts the levels the model sees (ddpm, ddim), not steps
  schedule: ScheduleKind = ScheduleKind.LOGSNR   # the default step schedule
  processes: tuple[ProcessKind, ...] = tuple(ProcessKind)
  uses_variance: bool = False                # takes the model's variance (ddpm)
  default_steps: int = 100                   # steps on a process without T
  adaptive: bool = False                     # chooses its own steps ('ode')
  # False: the solver returns the sample itself and `solve` adds no denoising at t_N.
  final_denoise: bool = True
  # Defined for consistency models only (`process.consistency`); sample_fn checks it.
  consistency_model: bool = False
  # A one-step solver's `stepper(denoiser, sched, **options) -> Step`, and how step i's key
  # derives from the solve's key; None for the multistep and adaptive ones (their state is
  # more than x: inpainting and RePaint refuse them).
  stepper: Callable | None = None
  step_key: Callable = fold_key


SOLVERS: dict[str, SolverInfo] = {
    'ddpm': SolverInfo(ddpm, 'ancestral sampling (Ho et al.), respaced when steps < T',
                       levels=True, schedule=ScheduleKind.RESPACED, uses_variance=True,
                       stepper=ddpm_step, step_key=chain_key),
    'ddim': SolverInfo(ddim, 'DDIM (Song et al.); eta > 0 adds noise', options={'eta': 'eta'},
                       levels=True, schedule=ScheduleKind.RESPACED, stepper=ddim_step,
                       step_key=chain_key),
    'euler': SolverInfo(euler, 'PF-ODE, Euler in sigma (Karras et al.)',
                        schedule=ScheduleKind.KARRAS, stepper=euler_step),
    'heun': SolverInfo(heun, 'PF-ODE, Heun, optional churn (Karras et al.)',
                       options={'churn': 's_churn'}, evaluations_per_step=2,
                       schedule=ScheduleKind.KARRAS, stepper=heun_step),
    'dpmpp_2m': SolverInfo(dpmpp_2m, 'PF-ODE, DPM-Solver++ 2M (Lu et al.)'),
    'dpmpp_3m': SolverInfo(dpmpp_3m, 'PF-ODE, DPM-Solver++ 3M'),
    'sde': SolverInfo(euler_maruyama, 'reverse SDE, Euler-Maruyama',
                      stepper=euler_maruyama_step),
    'pc': SolverInfo(predictor_corrector, 'predictor-corrector (Song et al.)',
                     options={'snr': 'snr'}, evaluations_per_step=2,
                     stepper=predictor_corrector_step),
    'ode': SolverInfo(ode_adaptive, 'adaptive PF-ODE (diffrax); set rtol, not steps',
                      options={'rtol': 'rtol'}, evaluations_per_step=None, adaptive=True),
    'ald': SolverInfo(annealed_langevin, 'annealed Langevin dynamics (ve, edm models)',
                      options={'langevin_steps': 'steps_per_level',
                               'langevin_step_size': 'step_size'},
                      evaluations_per_step=None, processes=(ProcessKind.VE, ProcessKind.EDM),
                      default_steps=10),
    'consistency': SolverInfo(consistency, 'consistency models: 1 evaluation per step '
                              '(Song et al. 2023); distilled workdirs only',
                              schedule=ScheduleKind.KARRAS, final_denoise=False,
                              consistency_model=True, default_steps=1),
}


class _SolverOption(Option):
  @classmethod
  def _what(cls):
    return 'sampler'


# The solvers by name, one member per registry entry (SolverKind.DDPM, SolverKind('heun'), ...).
SolverKind = _SolverOption('SolverKind', {name.upper(): name for name in SOLVERS})


def info(kind: str | SolverKind) -> SolverInfo:
  """The registry entry of `kind`."""
  return SOLVERS[kind.value if isinstance(kind, SolverKind) else SolverKind.parse(kind).value]


def num_evaluations(kind: str | SolverKind, num_steps: int, *, corrector_steps: int = 1,
                    steps_per_level: int = 100) -> int:
  """Model evaluations of a fixed-step solve with N steps, the final denoising included:
  ddpm, ddim, euler, dpmpp_2m/3m, sde: N + 1; heun: 2N + 1; pc: N(1 + corrector_steps) + 1;
  ald: (N + 1)·steps_per_level + 1; consistency: N (no final denoising)."""
  kind = SolverKind.parse(kind)
  if kind is SolverKind.ODE:
    raise ValueError("solver 'ode' is adaptive: its evaluations are in Solution.nfe")
  if kind is SolverKind.ALD:
    return (num_steps + 1) * steps_per_level + 1
  per_step = 1 + corrector_steps if kind is SolverKind.PC else info(kind).evaluations_per_step
  return per_step * num_steps + int(info(kind).final_denoise)


def solve(kind: str | SolverKind, denoiser: Denoiser, x_T: Array, sched: StepSchedule,
          rng: Array | None = None, **options) -> Solution:
  """Runs solver `kind` from x_T `[B, ...]` at t_0 = 1 (a draw of `process.prior_sample`)
  over `sched`; jit-safe for fixed `kind` and options (bind them with functools.partial; ddpm
  and ddim need the schedule concrete, closed over)."""
  kind = SolverKind.parse(kind)
  chex.assert_rank(sched.t, 1)
  if kind is SolverKind.ODE:
    x_end, nfe = ode_adaptive(denoiser, x_T, sched, rng, **options)
  else:
    x_end = info(kind).fn(denoiser, x_T, sched, rng, **options)
    nfe = jnp.asarray(num_evaluations(kind, sched.num_steps,
                                      corrector_steps=options.get('corrector_steps', 1),
                                      steps_per_level=options.get('steps_per_level', 100)) - 1,
                      jnp.int32)
  if not info(kind).final_denoise:   # x_end is the sample (its evaluations all counted)
    return Solution(x0=x_end, x_end=x_end, nfe=nfe + 1)
  x0 = denoiser(x_end, _bt(sched.t[-1], x_end))[0]
  return Solution(x0=x0, x_end=x_end, nfe=nfe + 1)
