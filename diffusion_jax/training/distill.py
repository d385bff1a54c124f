"""The distillation objectives: consistency distillation (`cd`, Song et al. 2023) and
progressive distillation (`pd`, Salimans & Ho 2022), as per-example losses of denoisers.
Pure JAX, no IO; `step.train_step` runs them when the spec has a `distill` part.

Every model is a denoiser `(x [B, ...], t [B]) -> (x̂₀, ε̂)` of one process (the teacher's):
the teacher's from `continuous.make_denoiser`, the consistency student's and its target's
wrapped by `consistency.consistency_denoiser`.

cd (Algorithm 2 of Song et al. 2023, in σ̃ = σ/α on x̃ = x/α): N levels σ̃_min = σ̃_{N−1} < … <
σ̃_0 = σ̃(t = 1) spaced as Karras et al. (ρ = 7), a level n ~ U{0, …, N−2} per example,
x_n = q(x₀, t_n, z), one teacher Heun step (the `heun` solver, run unchanged) from t_n to
t_{n+1}, and the loss d(f_θ(x_n, t_n), sg f_θ⁻(x̂_{n+1}, t_{n+1})) with λ = 1; θ⁻ is an EMA
of θ with decay μ behind a stop-gradient.

pd (Algorithm 2 of Salimans & Ho): the student takes K levels t_j = 1 − j/K ('trailing'); at
a level t its one DDIM step to s = t − 1/K must land where the teacher's two DDIM steps
t → t − 1/2K → s land, so its x̂₀ target is x̃ = (x_s − (σ_s/σ_t) x_t)/(α_s − (σ_s/σ_t) α_t);
at s = 0 (α 1, σ 0) that is the teacher's last x̂₀. Loss: max(α²/σ², 1)·‖x̂₀ − x̃‖², the
"truncated SNR" weighting, per pixel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.process.continuous import Denoiser, Process
from diffusion_jax.sampling import solvers
from diffusion_jax.spec import Distance

Array = jax.Array


def default_huber_c(dim: int) -> float:
  """iCT's c = 0.00054·√d for d pixel values in [-1, 1]."""
  return 0.00054 * float(np.sqrt(dim))


def distance(a: Array, b: Array, kind: Distance, huber_c: float | None = None) -> Array:
  """Per example `[B]` of `[B, ...]` pairs."""
  axes = tuple(range(1, a.ndim))
  kind = Distance.parse(kind)
  if kind is Distance.L2:
    return jnp.mean(jnp.square(a - b), axis=axes)
  c = default_huber_c(int(np.prod(a.shape[1:]))) if huber_c is None else huber_c
  sq = jnp.sum(jnp.square(a - b), axis=axes)
  # √(q + c²) − c written as q/(√(q + c²) + c): no cancellation when q ≪ c².
  return sq / (jnp.sqrt(sq + c ** 2) + c)


# ------------------------------------------------------------------------------------------
# Consistency distillation.
# ------------------------------------------------------------------------------------------


def cd_times(process: Process, num_levels: int) -> Array:
  """The N = `num_levels` decreasing times t_0 = 1 > … > t_{N−1} = t_min of the Karras levels
  (ρ = 7) in σ̃: the solvers' 'karras' schedule of N − 1 steps."""
  if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
    raise ValueError(f'distill.num_levels must be an integer >= 2, got {num_levels!r}')
  with jax.ensure_compile_time_eval():
    return solvers.step_schedule(process, num_levels - 1, 'karras').t


def teacher_heun_step(teacher: Denoiser, process: Process, x: Array, t_from: Array,
                      t_to: Array) -> Array:
  """One Heun step of the PF-ODE per example, from t_from `[B]` to t_to `[B]`: the `heun`
  solver on each example's two-level schedule (2 teacher evaluations)."""
  def one(xi, a, b):
    sched = solvers.StepSchedule(process=process, t=jnp.stack([a, b]))
    return solvers.heun(teacher, xi[None], sched)[0]
  return jax.vmap(one)(x, t_from, t_to)


def cd_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, process: Process,
            x0: Array, t_hi: Array, t_lo: Array, noise: Array, *,
            dist: Distance = Distance.L2, huber_c: float | None = None,
            teacher_step=teacher_heun_step) -> Array:
  """The consistency-distillation loss per example `[B]`: x0, noise `[B, ...]`; t_hi > t_lo
  `[B]` adjacent levels of `cd_times`. `teacher_step(teacher, process, x, t_from, t_to)`:
  the ODE step (Heun; the tests put the exact map there)."""
  x_hi = process.q_sample(x0, t_hi, noise)
  x_lo = jax.lax.stop_gradient(teacher_step(teacher, process, x_hi, t_hi, t_lo))
  online = student(x_hi, t_hi)[0]
  aim = jax.lax.stop_gradient(target(x_lo, t_lo)[0])
  return distance(online, aim, dist, huber_c)


# ------------------------------------------------------------------------------------------
# Progressive distillation.
# ------------------------------------------------------------------------------------------


def pd_steps(step: Array | int, start_steps: int, final_steps: int, steps_per_round: int):
  """The student's step count K at training step `step`: start_steps halved after every
  `steps_per_round` steps, never below final_steps."""
  halvings = step // steps_per_round
  if isinstance(step, (int, np.integer)):
    return max(start_steps >> min(int(halvings), 62), final_steps)
  return jnp.maximum(jnp.right_shift(jnp.int32(start_steps), jnp.minimum(halvings, 30)),
                     final_steps)


def _ab(process: Process, t: Array) -> tuple[Array, Array]:
  """α(t), σ(t) with t = 0 read as the data (1, 0)."""
  zero = t <= 0.0
  safe = jnp.where(zero, process.t_min, t)
  return (jnp.where(zero, 1.0, process.alpha(safe)), jnp.where(zero, 0.0, process.sigma(safe)))


def ddim_step(denoiser: Denoiser, process: Process, x: Array, t: Array, s: Array) -> Array:
  """x_s = α_s x̂₀ + σ_s ε̂ of `denoiser` at (x, t), per example (t, s `[B]`; s = 0 gives x̂₀)."""
  x0, eps = denoiser(x, t)[:2]
  b = lambda c: jnp.reshape(c, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  a_s, s_s = _ab(process, s)
  return b(a_s) * x0 + b(s_s) * eps


def pd_target(teacher: Denoiser, process: Process, x_t: Array, t: Array, k: Array) -> Array:
  """The x̂₀ target `[B, ...]` at x_t, t `[B]` for a student of k steps (k `[B]` or scalar)."""
  h = 1.0 / jnp.asarray(k, jnp.float32)
  t_mid, s = t - 0.5 * h, jnp.maximum(t - h, 0.0)
  s = jnp.where(s < 0.5 * h, 0.0, s)   # the last level lands on the data exactly
  x_mid = ddim_step(teacher, process, x_t, t, t_mid)
  x_s = ddim_step(teacher, process, x_mid, t_mid, s)
  b = lambda c: jnp.reshape(c, (-1,) + (1,) * (x_t.ndim - 1)).astype(x_t.dtype)
  a_t, s_t = _ab(process, t)
  a_s, s_s = _ab(process, s)
  ratio = s_s / s_t
  return (x_s - b(ratio) * x_t) / b(a_s - ratio * a_t)


def pd_loss(student: Denoiser, teacher: Denoiser, process: Process, x0: Array, t: Array,
            k: Array, noise: Array) -> Array:
  """max(SNR(t), 1)·mean over pixels (x̂₀ − x̃)² per example `[B]`."""
  x_t = process.q_sample(x0, t, noise)
  aim = jax.lax.stop_gradient(pd_target(teacher, process, x_t, t, k))
  a_t, s_t = _ab(process, t)
  weight = jnp.maximum(jnp.square(a_t / s_t), 1.0)
  return weight * distance(student(x_t, t)[0], aim, Distance.L2)


def pd_time(rng: Array, k: Array) -> Array:
  """One of the student's levels t_j = 1 − j/k, j ~ U{0, …, k − 1} (a scalar draw)."""
  j = jax.random.randint(rng, (), 0, k)
  return 1.0 - j.astype(jnp.float32) / jnp.asarray(k, jnp.float32)


def cd_level(rng: Array, num_levels: int) -> Array:
  """n ~ U{0, …, N − 2} (a scalar draw): the step from level n to n + 1."""
  return jax.random.randint(rng, (), 0, num_levels - 1)

