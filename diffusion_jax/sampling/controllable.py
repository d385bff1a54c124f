"""Controllable generation from any trained model, over the solvers' one denoiser: inpainting
(score_sde's replacement, RePaint's resampling), image-to-image (SDEdit) and classifier
guidance. Pure JAX, no IO; `sampling.sampler` binds them to a network.

Inpainting. `mask` is 1 on the known pixels (kept) and 0 on the unknown ones (generated).
After every solver step to a level t, the known pixels of the state are replaced by the known
image noised to t, α(t)·x_known + σ(t)·z with fresh z (Song et al. 2021, `get_pc_inpainter`);
the sample's known pixels are the known image itself, exactly. RePaint (Lugmayr et al. 2022)
also walks back: after every `jump_length` steps down it re-noises the state `jump_length`
levels up with the forward process, q(x_u | x_t) = N((α_u/α_t) x_t, σ_u² − (α_u/α_t)² σ_t²),
and descends again, `jump_n_sample` times in all, so that the unknown pixels are harmonised
with the known ones. Any one-step solver runs it (ddpm, ddim, euler, heun, sde, pc: a
`SolverInfo.stepper`); the multistep DPM-Solver++ keeps x̂₀ of earlier levels that a
replacement or a jump has made stale, and the adaptive solve has no levels to replace at.

Image-to-image (Meng et al. 2022, SDEdit). `strength` s ∈ (0, 1] keeps the last k = ⌊s·N⌋
of a sampler's N steps (diffusers' img2img convention): the image is noised to the level the
k-th last step starts from, α·x + σ·z, and the sampler runs from there. k = 0 returns the image.

Classifier guidance (Dhariwal & Nichol 2021, Alg. 2; Song et al. 2021's conditional score).
With a noise-conditional classifier's log p(y | x_t), the score becomes
∇ log p(x_t) + s·∇ log p(y | x_t): ε̂ ← ε̂ − s·σ·∇ₓ log p(y | x_t), x̂₀ ← x̂₀ + s·(σ²/α)·∇ₓ log p.
At s = 1 with exact models it is the score of p(x_t | y). It is a denoiser, so every solver
runs on it, and it composes with classifier-free guidance inside the network's denoiser.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.options import Option
from diffusion_jax.process.continuous import Denoiser
from diffusion_jax.process.gaussian_diffusion import Array
from diffusion_jax.sampling import solvers


class Region(Option):
  """A named unknown region of an image (the pixels inpainting generates)."""
  TOP = 'top'          # rows [0, H/2)
  BOTTOM = 'bottom'    # rows [H/2, H)
  LEFT = 'left'        # columns [0, W/2)
  RIGHT = 'right'      # columns [W/2, W)
  CENTER = 'center'    # rows and columns [H/4, 3H/4) × [W/4, 3W/4)

  @classmethod
  def _what(cls):
    return 'mask'


def region_mask(region: str | Region, image_shape: tuple[int, int, int]) -> np.ndarray:
  """The known-pixel mask float32 `[H, W, C]` (1 known, 0 unknown) whose unknown part is
  `region`."""
  region = Region.parse(region)
  h, w, c = image_shape
  unknown = np.zeros((h, w), bool)
  if region is Region.TOP:
    unknown[:h // 2] = True
  elif region is Region.BOTTOM:
    unknown[h // 2:] = True
  elif region is Region.LEFT:
    unknown[:, :w // 2] = True
  elif region is Region.RIGHT:
    unknown[:, w // 2:] = True
  else:
    unknown[h // 4:h - h // 4, w // 4:w - w // 4] = True
  return np.repeat((~unknown)[..., None], c, axis=-1).astype(np.float32)


def check_mask(mask: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
  """`mask` (`[H, W]`, `[H, W, C]` or `[N, H, W, C]`; C may be 1) as float32 with C channels,
  1 known and 0 unknown; a one-line ValueError for another shape, values other than 0 and 1,
  or no unknown pixel."""
  m = np.asarray(mask)
  if m.ndim == 2:
    m = m[..., None]
  h, w, c = image_shape
  if m.ndim not in (3, 4) or m.shape[-3:-1] != (h, w) or m.shape[-1] not in (1, c):
    raise ValueError(f'the mask has shape {m.shape}; expected [H, W], [H, W, C] or '
                     f'[N, H, W, C] with H, W = {h}, {w} and C = 1 or {c}')
  m = m.astype(np.float32) if m.dtype == bool else m
  if not np.all((m == 0) | (m == 1)):
    raise ValueError('the mask must hold 0 (unknown) and 1 (known) only, got values in '
                     f'[{float(np.min(m)):g}, {float(np.max(m)):g}]')
  if np.all(m == 1):
    raise ValueError('the mask has no unknown pixel (all 1): there is nothing to inpaint')
  return np.ascontiguousarray(np.broadcast_to(m, m.shape[:-1] + (c,)), np.float32)


# ------------------------------------------------------------------------------------------
# Inpainting.
# ------------------------------------------------------------------------------------------


def repaint_levels(num_steps: int, jump_length: int = 1, jump_n_sample: int = 1) -> np.ndarray:
  """The levels an inpainting solve visits, int `[M + 1]`, from 0 (t = 1) to `num_steps`
  (the last level), moving one level at a time: down by a solver step, up by the forward
  process. RePaint's `get_schedule_jump`: on the way down, at every level that is a multiple
  of `jump_length` steps from the end (the end included, the start excluded) the solve goes
  back up `jump_length` levels, `jump_n_sample − 1` times. (1, 1): straight down, N steps."""
  for name, v in (('jump_length', jump_length), ('jump_n_sample', jump_n_sample)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {v!r}')
  if jump_n_sample > 1 and jump_length >= num_steps:
    raise ValueError(f'jump_length={jump_length} must be below the {num_steps} steps of the '
                     'schedule to jump back at all')
  remaining = {r: jump_n_sample - 1 for r in range(0, num_steps - jump_length, jump_length)}
  r, seq = num_steps, [num_steps]   # r: steps left to the last level
  while r > 0:
    r -= 1
    seq.append(r)
    if remaining.get(r, 0) > 0:
      remaining[r] -= 1
      for _ in range(jump_length):
        r += 1
        seq.append(r)
  return num_steps - np.asarray(seq, np.int32)


def inpaint(denoiser: Denoiser, sched: solvers.StepSchedule, known: Array, mask: Array,
            rng: Array, *, kind: str = 'ddpm', jump_length: int = 1, jump_n_sample: int = 1,
            **options) -> solvers.Solution:
  """Fills the unknown pixels of `known` `[B, ...]` (`mask` 1 on the known ones, broadcast to
  its shape) with solver `kind` over `sched`; RePaint's resampling when `jump_n_sample` > 1.

  The start is a prior draw from the first half of `split(rng)` and the steps' keys are the
  solver's own of the second half, so with no known pixel and no jumps this is `solve`
  (and `sampler.sample`) bit for bit. Returns the `Solution`: x0 equals `known` exactly where
  `mask` is 1; nfe counts every step down, and the final denoising.
  """
  info = solvers.info(kind)
  if info.stepper is None:
    supported = ', '.join(n for n, i in solvers.SOLVERS.items() if i.stepper is not None)
    raise ValueError(f'inpainting replaces the known pixels after every step of a one-step '
                     f'solver ({supported}); {solvers.SolverKind.parse(kind).value!r} is not one')
  process = sched.process
  mask = jnp.broadcast_to(jnp.asarray(mask, known.dtype), known.shape)
  levels = repaint_levels(sched.num_steps, jump_length, jump_n_sample)
  frm, to = levels[:-1], levels[1:]
  down = to > frm
  # The how-many-th visit of its level each step down is (0: the first, the solver's key).
  visit = np.zeros_like(frm)
  seen: dict[int, int] = {}
  for j in np.flatnonzero(down):
    visit[j] = seen.get(int(frm[j]), 0)
    seen[int(frm[j])] = visit[j] + 1
  step = info.stepper(denoiser, sched, **options)
  la = process.log_alpha_t(sched.t)                      # [N + 1]
  ls = process.log_sigma_t(sched.t)
  bc = lambda c: jnp.reshape(c, (1,) * known.ndim).astype(known.dtype)
  init_rng, loop_rng = jax.random.split(rng)
  replace_rng = jax.random.fold_in(rng, 0x1A5)
  up_rng = jax.random.fold_in(rng, 0xB0)

  def replace(x, i, key):
    z = jax.random.normal(key, x.shape, x.dtype)
    noised = bc(jnp.exp(la[i])) * known + bc(jnp.exp(ls[i])) * z
    return mask * noised + (1.0 - mask) * x

  def move(x, xs):
    j, i, is_down, n = xs

    def step_down(x):
      key = info.step_key(loop_rng, sched, i)
      key = jax.lax.cond(n > 0, lambda k: jax.random.fold_in(k, n), lambda k: k, key)
      return replace(step(x, i, key), i + 1, jax.random.fold_in(replace_rng, j))

    def step_up(x):   # level i to i − 1: q(x_u | x_t)
      ratio = jnp.exp(la[i - 1] - la[i])
      var = jnp.maximum(jnp.exp(2.0 * ls[i - 1]) - ratio ** 2 * jnp.exp(2.0 * ls[i]), 0.0)
      z = jax.random.normal(jax.random.fold_in(up_rng, j), x.shape, x.dtype)
      return bc(ratio) * x + bc(jnp.sqrt(var)) * z
    return jax.lax.cond(is_down, step_down, step_up, x), None

  x = process.prior_sample(init_rng, known.shape, known.dtype)
  x = replace(x, 0, jax.random.fold_in(replace_rng, len(frm)))
  xs = (jnp.arange(len(frm)), jnp.asarray(frm), jnp.asarray(down), jnp.asarray(visit))
  x_end, _ = jax.lax.scan(move, x, xs)
  x0 = denoiser(x_end, solvers._bt(sched.t[-1], x_end))[0]   # pylint: disable=protected-access
  x0 = mask * known + (1.0 - mask) * x0
  nfe = solvers.num_evaluations(kind, int(np.sum(down)),
                                corrector_steps=options.get('corrector_steps', 1))
  return solvers.Solution(x0=x0, x_end=x_end, nfe=jnp.asarray(nfe, jnp.int32))


# ------------------------------------------------------------------------------------------
# Image-to-image.
# ------------------------------------------------------------------------------------------


def check_strength(strength) -> float:
  """`strength` as a float in (0, 1]; a one-line ValueError otherwise."""
  if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
      or not 0.0 < float(strength) <= 1.0:
    raise ValueError(f'strength must be a number in (0, 1], got {strength!r}')
  return float(strength)


def strength_steps(num_steps: int, strength: float) -> int:
  """k = ⌊strength·N⌋ (diffusers' img2img), the steps image-to-image runs."""
  # (the 1e-9: 0.02·50 is 0.99999… in floating point, and means one step)
  return min(int(np.floor(num_steps * check_strength(strength) + 1e-9)), num_steps)


def image_to_image(denoiser: Denoiser, sched: solvers.StepSchedule, images: Array,
                   strength: float, rng: Array, *, kind: str = 'ddpm',
                   **options) -> solvers.Solution:
  """SDEdit: `images` `[B, ...]` noised to the level where the last k = ⌊strength·N⌋ steps
  of `sched` start (noise from the first half of `split(rng)`), then solver `kind` over those
  k steps (keys from the second half). k = 0 returns `images` itself, with nfe 0.

  `sched` must be concrete (built outside `jit`; every sampler's levels are).
  """
  info = solvers.info(kind)
  if info.adaptive:
    raise ValueError(f'image-to-image keeps the last steps of a fixed-step sampler; '
                     f'{solvers.SolverKind.parse(kind).value!r} chooses its own steps: use '
                     'another sampler')
  n = sched.num_steps
  k = strength_steps(n, strength)
  if k == 0:
    return solvers.Solution(x0=images, x_end=images, nfe=jnp.zeros((), jnp.int32))
  with jax.ensure_compile_time_eval():
    sub = solvers.StepSchedule(process=sched.process, t=sched.t[n - k:])
  noise_rng, loop_rng = jax.random.split(rng)
  t0 = solvers._bt(sub.t[0], images)   # pylint: disable=protected-access
  z = jax.random.normal(noise_rng, images.shape, images.dtype)
  x = sched.process.q_sample(images, t0, z).astype(images.dtype)
  return solvers.solve(kind, denoiser, x, sub, loop_rng, **options)


# ------------------------------------------------------------------------------------------
# The task, as `sampler.sample_fn` runs it.
# ------------------------------------------------------------------------------------------


class Task(Option):
  INPAINT = 'inpaint'
  IMAGE_TO_IMAGE = 'image_to_image'

  @classmethod
  def _what(cls):
    return 'task'


def inpainting_solvers() -> tuple[str, ...]:
  """The solvers inpainting runs: the one-step ones (a `SolverInfo.stepper`)."""
  return tuple(n for n, i in solvers.SOLVERS.items() if i.stepper is not None)


@dataclasses.dataclass(frozen=True)
class Control:
  """What a sampler does instead of sampling from the prior: inpainting (RePaint's
  resampling when `jump_n_sample` > 1) or image-to-image at `strength`."""
  task: Task
  jump_length: int = 1
  jump_n_sample: int = 1
  strength: float | None = None

  def __post_init__(self):
    object.__setattr__(self, 'task', Task.parse(self.task))
    if self.inpainting:
      repaint_levels(max(self.jump_length + 1, 2), self.jump_length, self.jump_n_sample)
      if self.strength is not None:
        raise ValueError('strength is for image-to-image, not inpainting')
    else:
      object.__setattr__(self, 'strength', check_strength(self.strength))
      if (self.jump_length, self.jump_n_sample) != (1, 1):
        raise ValueError('jump_length and jump_n_sample are for inpainting (RePaint), not '
                         'image-to-image')

  @property
  def inpainting(self) -> bool:
    return self.task is Task.INPAINT

  def check(self, sampler) -> None:
    """A one-line ValueError where `sampler` (a `SamplerConfig`) cannot run this task."""
    kind = sampler.kind.value
    if self.inpainting and kind not in inpainting_solvers():
      raise ValueError(f'--inpaint replaces the known pixels after every step of a one-step '
                       f'sampler ({", ".join(inpainting_solvers())}), not {kind!r}: '
                       'multistep and adaptive solvers carry state that a replacement makes '
                       'stale')
    if not self.inpainting and sampler.info.adaptive:
      raise ValueError(f'image-to-image keeps the last steps of a fixed-step sampler; {kind!r} '
                       'chooses its own steps: use another --sampler')

  def run(self, denoiser: Denoiser, sched: solvers.StepSchedule, images: Array, masks: Array,
          rng: Array, *, kind, **options) -> solvers.Solution:
    if self.inpainting:
      return inpaint(denoiser, sched, images, masks, rng, kind=kind,
                     jump_length=self.jump_length, jump_n_sample=self.jump_n_sample, **options)
    return image_to_image(denoiser, sched, images, self.strength, rng, kind=kind, **options)


# ------------------------------------------------------------------------------------------
# Classifier guidance.
# ------------------------------------------------------------------------------------------

# log p(y | x_t) per example `[B]` of a noisy image x `[B, ...]` at times t `[B]`, the labels
# closed over.
LogProbFn = Callable[[Array, Array], Array]


def classifier_guided(denoiser: Denoiser, process, log_prob: LogProbFn, scale: float
                      ) -> Denoiser:
  """`denoiser` whose score has s·∇ₓ log p(y | x_t) added (s = `scale`): ε̂ − s·σ·g and
  x̂₀ + s·(σ²/α)·g, g = ∇ₓ log p(y | x_t) per example. Further outputs pass through."""

  def guided(x: Array, t: Array):
    x0, eps, *rest = denoiser(x, t)
    g = jax.grad(lambda v: jnp.sum(log_prob(v, t)))(x)     # per example: rows independent
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha = jnp.reshape(process.alpha(t), shape).astype(x.dtype)
    sigma = jnp.reshape(process.sigma(t), shape).astype(x.dtype)
    return (x0 + scale * (sigma ** 2 / alpha) * g, eps - scale * sigma * g, *rest)

  return guided


def classifier_log_prob(logits_fn: Callable[[Array, Array], Array], process,
                        labels: Array) -> LogProbFn:
  """log p(y | x_t) of a network `logits_fn(c_in·x, model_timestep) -> [B, classes]` (a
  noise-conditional classifier of `process`, fed as the denoising network is)."""

  def log_prob(x: Array, t: Array) -> Array:
    shape = (-1,) + (1,) * (x.ndim - 1)
    logits = logits_fn(x * jnp.reshape(process.input_scale(t), shape).astype(x.dtype),
                       process.model_timestep(t))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]

  return log_prob
