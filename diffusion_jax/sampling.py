"""Sampling from a trained U-Net: classifier-free guidance and data-parallel sampler runs.

Joins the model to the pure samplers of `samplers.py`. No IO.
"""

from __future__ import annotations

import dataclasses
import enum

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import gaussian_diffusion as gd
from diffusion_jax import parallel
from diffusion_jax import continuous
from diffusion_jax import samplers
from diffusion_jax import solvers

AXIS = parallel.AXIS


class SamplerKind(enum.Enum):
  """A sampler: the discrete-time chains of `samplers.py`, or a solver of the continuous-time
  view (`solvers.py`) of the same process."""
  DDPM = 'ddpm'          # ancestral; respaced when steps < T
  DDIM = 'ddim'
  EULER = 'euler'        # PF-ODE, Karras et al. 2022
  HEUN = 'heun'          # PF-ODE, 2nd order, optional churn
  DPMPP_2M = 'dpmpp_2m'  # DPM-Solver++ 2M (Lu et al. 2022)
  DPMPP_3M = 'dpmpp_3m'
  SDE = 'sde'            # Euler–Maruyama on the reverse SDE
  PC = 'pc'              # predictor–corrector (Song et al. 2021)
  ODE = 'ode'            # adaptive PF-ODE solve (diffrax); reports its evaluations
  ALD = 'ald'            # annealed Langevin dynamics (Song & Ermon 2019): the 've' process

  @property
  def solver(self) -> 'solvers.SolverKind | None':
    """The continuous-time solver, or None for ddpm and ddim."""
    if self in (SamplerKind.DDPM, SamplerKind.DDIM):
      return None
    return solvers.SolverKind.parse(self.value)


# The step schedule each solver uses unless told otherwise: log-SNR steps for the exponential
# integrators and the SDE samplers, Karras' ρ = 7 for the σ-space Euler and Heun.
DEFAULT_STEP_SCHEDULE = {
    SamplerKind.EULER: solvers.ScheduleKind.KARRAS,
    SamplerKind.HEUN: solvers.ScheduleKind.KARRAS,
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample: the one parsed value that sample.py, the training-time grid and the
  evaluation read. Strings are parsed on construction (`SamplerConfig('dpmpp_2m', steps=20)`).

  steps: ddpm, ddim and the fixed-step solvers (None: all T); not for 'ode'.
  eta: DDIM only. churn: Heun's S_churn. snr: the PC corrector's target signal-to-noise.
  step_schedule: the solvers' time steps ('time_uniform', 'logsnr', 'karras'; None: the
    solver's default). rtol: the adaptive 'ode' solve's tolerance (rtol = atol).
  clip_denoised: clip x̂₀ to [-1, 1] at each model evaluation (ε̂ follows from it).
  langevin_steps, langevin_step_size: ald's steps per noise level (T) and its ε (the step at
    level i is ε·σ_i²/σ_L²); `steps` is then the number of levels less one.
  """
  kind: SamplerKind = SamplerKind.DDPM
  steps: int | None = None
  eta: float = 0.0
  clip_denoised: bool = True
  guidance_scale: float = 0.0     # classifier-free guidance weight w (0: none)
  step_schedule: solvers.ScheduleKind | None = None
  churn: float = 0.0
  snr: float = 0.16
  rtol: float = 1e-3
  langevin_steps: int = 100
  langevin_step_size: float = 2e-5

  def __post_init__(self):
    if not isinstance(self.kind, SamplerKind):
      try:
        object.__setattr__(self, 'kind', SamplerKind(self.kind))
      except ValueError:
        allowed = ', '.join(k.value for k in SamplerKind)
        raise ValueError(f'unknown sampler {self.kind!r}; allowed: {allowed}') from None
    kind = self.kind
    if self.steps is not None:
      if (isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1):
        raise ValueError(f'sampler steps must be a positive integer (or None: all T), got '
                         f'{self.steps!r}')
      if kind is SamplerKind.ODE:
        raise ValueError("the 'ode' sampler chooses its own steps: set rtol, not steps")
    if self.eta < 0:
      raise ValueError(f'eta must be >= 0, got {self.eta}')
    if self.eta and kind is not SamplerKind.DDIM:
      raise ValueError(f'eta applies to the ddim sampler only, not {kind.value!r}')
    if self.guidance_scale < 0:
      raise ValueError(f'guidance_scale must be >= 0, got {self.guidance_scale}')
    if self.step_schedule is not None:
      if kind.solver is None:
        raise ValueError(f'step_schedule applies to the solvers, not {kind.value!r}')
      object.__setattr__(self, 'step_schedule', solvers.ScheduleKind.parse(self.step_schedule))
    if self.churn < 0 or (self.churn and kind is not SamplerKind.HEUN):
      raise ValueError(f'churn must be >= 0 and applies to heun only, got {self.churn} for '
                       f'{kind.value!r}')
    if not self.snr > 0:
      raise ValueError(f'snr must be > 0, got {self.snr}')
    if not 0 < self.rtol < 1:
      raise ValueError(f'rtol must be in (0, 1), got {self.rtol}')
    if (isinstance(self.langevin_steps, bool) or int(self.langevin_steps) != self.langevin_steps
        or self.langevin_steps < 1):
      raise ValueError(f'langevin_steps must be a positive integer, got {self.langevin_steps!r}')
    if not self.langevin_step_size > 0:
      raise ValueError(f'langevin_step_size must be > 0, got {self.langevin_step_size!r}')

  @classmethod
  def create(cls, kind: str | SamplerKind = 'ddpm', **kwargs) -> 'SamplerConfig':
    return cls(kind=kind, **kwargs)

  def with_options(self, kind: str | SamplerKind | None = None, **options) -> 'SamplerConfig':
    """This sampler with `options` (names in `OPTIONS`; None: keep) replaced. A `kind` other
    than this one starts from that kind's defaults, since options of one sampler (eta, churn)
    may not apply to another."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise ValueError(f'unknown sampler option {unknown[0]!r}; allowed: {", ".join(OPTIONS)}')
    base = self
    if kind is not None and SamplerConfig(kind).kind is not self.kind:
      base = SamplerConfig(kind, clip_denoised=self.clip_denoised)
    return dataclasses.replace(base, **{k: v for k, v in options.items() if v is not None})

  @property
  def schedule(self) -> 'solvers.ScheduleKind':
    """The solvers' step schedule, with the solver's default filled in."""
    return self.step_schedule or DEFAULT_STEP_SCHEDULE.get(self.kind, solvers.ScheduleKind.LOGSNR)

  def check_steps(self, num_timesteps: int) -> None:
    """Raises a one-line ValueError unless the steps fit a process of T = `num_timesteps`."""
    if self.steps is not None and self.steps > num_timesteps:
      raise ValueError(f'sampler steps must be in [1, {num_timesteps}] (the model\'s T), got '
                       f'{self.steps}')

  def num_evaluations(self, num_timesteps: int) -> int | None:
    """Model evaluations per sample (a guided one evaluates a doubled batch); None for the
    adaptive 'ode', which reports its own."""
    steps = self.steps or num_timesteps
    if self.kind in (SamplerKind.DDPM, SamplerKind.DDIM):
      return steps
    if self.kind is SamplerKind.ODE:
      return None
    return solvers.num_evaluations(self.kind.solver, steps, steps_per_level=self.langevin_steps)

  def describe(self) -> str:
    """'dpmpp_2m, 20 steps (logsnr)' and the like, for logs and file names."""
    if self.kind is SamplerKind.ODE:
      return f'ode (rtol {self.rtol:g})' + (
          f', guidance {self.guidance_scale:g}' if self.guidance_scale else '')
    steps = f'{self.steps} steps' if self.steps else 'all steps'
    extra = (f', churn {self.churn:g}' if self.churn else '') + (
        f', eta {self.eta:g}' if self.kind is SamplerKind.DDIM and self.eta else '') + (
        f', snr {self.snr:g}' if self.kind is SamplerKind.PC else '') + (
        f', {self.langevin_steps} per level, step {self.langevin_step_size:g}'
        if self.kind is SamplerKind.ALD else '') + (
        f', guidance {self.guidance_scale:g}' if self.guidance_scale else '')
    return f'{self.kind.value}, {steps}{extra}' + (f' ({self.schedule.value})'
                                                    if self.kind.solver else '')

  def to_dict(self) -> dict:
    return dict(kind=self.kind.value, steps=self.steps, eta=self.eta,
                clip_denoised=self.clip_denoised, guidance_scale=self.guidance_scale,
                step_schedule=self.step_schedule.value if self.step_schedule else None,
                churn=self.churn, snr=self.snr, rtol=self.rtol,
                langevin_steps=self.langevin_steps,
                langevin_step_size=self.langevin_step_size)

  @classmethod
  def from_dict(cls, d) -> 'SamplerConfig':
    return cls(**d)


# The options of every sampler, by the one name that sample.py's and evaluate's flags
# (diffusion_jax/sampler_flags.py) and the config groups `training` and `eval` give them.
OPTIONS = ('steps', 'eta', 'step_schedule', 'churn', 'snr', 'rtol', 'guidance_scale',
           'langevin_steps', 'langevin_step_size')


def make_denoise_fn(model: nn.Module, params, labels: jax.Array | None = None, *,
                    guidance_scale: float = 0.0, num_classes: int | None = None):
  """`denoise_fn(x_t, t)` of a U-Net with fixed params and labels `[B]`.

  With `guidance_scale` w > 0 (classifier-free guidance, Ho & Salimans 2022) the mean output
  is (1 + w)·f(x, y) − w·f(x, ∅), ∅ being label `num_classes`; the variance output, if any,
  comes from the conditional branch.
  """
  def plain(x_t, t, y):
    return model.apply({'params': params}, x_t, t, y=y, train=False)

  if not guidance_scale:
    return lambda x_t, t: plain(x_t, t, labels)
  if labels is None or num_classes is None:
    raise ValueError('classifier-free guidance needs labels and a class-conditional model')

  def guided(x_t, t):
    b, c = x_t.shape[0], x_t.shape[-1]
    both = plain(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, jnp.full_like(labels, num_classes)]))
    cond, uncond = both[:b], both[b:]
    mean = (1.0 + guidance_scale) * cond[..., :c] - guidance_scale * uncond[..., :c]
    return jnp.concatenate([mean, cond[..., c:]], axis=-1)
  return guided


def sample_fn(model: nn.Module, diffusion: gd.GaussianDiffusion, *,
              parameterization: gd.Parameterization, sampler: SamplerConfig,
              num_classes: int | None = None, process: continuous.Process | None = None):
  """`fn(params, rng, labels, x_shape) -> (images [B, H, W, C] in [-1, 1], nfe)` on one
  device; nfe (int32 []) counts the model evaluations per sample.

  Everything fixed is resolved here, on the host, once: the respaced process of a DDPM with
  fewer steps, or the continuous-time process and step schedule of a solver. A parameterisation
  that a solver cannot use (`xprev` with an ODE/SDE solver) is a one-line ValueError.

  `process`: the model's continuous-time process (`DiffusionSpec.make_process`); None reads
  `diffusion` as a VP-SDE. The solvers start from its prior; ddpm and ddim need 'vp'.
  """
  if process is None:
    process = continuous.VPProcess.from_diffusion(diffusion)
  if process.kind is not continuous.ProcessKind.VP and sampler.kind.solver is None:
    raise ValueError(f'sampler {sampler.kind.value!r} runs the discrete DDPM chain, which the '
                     f'{process.kind.value!r} process does not have: use a solver (sde, pc, '
                     'ode, ...)')
  if process.kind is continuous.ProcessKind.VP:
    sampler.check_steps(diffusion.num_timesteps)
  mean_type, var_type = parameterization.mean_type, parameterization.var_type
  steps = sampler.steps or diffusion.num_timesteps
  kind = sampler.kind
  d = diffusion
  if kind is SamplerKind.DDPM and steps != diffusion.num_timesteps:
    d = samplers.respace(diffusion, samplers.space_timesteps(diffusion.num_timesteps, steps))
  if kind.solver is not None:
    continuous.parse_continuous_mean_type(mean_type)
    if process.num_timesteps is None and not sampler.steps:
      steps = 100 if kind is not SamplerKind.ALD else 10   # a continuous process has no T
    schedule = solvers.step_schedule(process, 1 if kind is SamplerKind.ODE else steps,
                                     sampler.schedule)
    options = {SamplerKind.HEUN: dict(s_churn=sampler.churn),
               SamplerKind.PC: dict(snr=sampler.snr),
               SamplerKind.ODE: dict(rtol=sampler.rtol, atol=sampler.rtol),
               SamplerKind.ALD: dict(steps_per_level=sampler.langevin_steps,
                                     step_size=sampler.langevin_step_size)}.get(kind, {})

  def fn(params, rng, labels, x_shape):
    denoise = make_denoise_fn(model, params, labels if num_classes else None,
                              guidance_scale=sampler.guidance_scale,
                              num_classes=num_classes)
    if kind is SamplerKind.DDIM:
      x0 = samplers.ddim_sample_loop(d, denoise, x_shape, rng, num_steps=steps,
                                     eta=sampler.eta, mean_type=mean_type,
                                     clip_denoised=sampler.clip_denoised)
      return x0, jnp.asarray(steps, jnp.int32)
    if kind is SamplerKind.DDPM:
      x0 = samplers.p_sample_loop(d, denoise, x_shape, rng, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=sampler.clip_denoised)
      return x0, jnp.asarray(steps, jnp.int32)
    denoiser = continuous.make_denoiser(process, denoise, mean_type)
    if sampler.clip_denoised:
      denoiser = continuous.clip_x0(process, denoiser)
    init_rng, loop_rng = jax.random.split(rng)
    x_T = process.prior_sample(init_rng, x_shape, jnp.float32)  # at t = 1
    solution = solvers.solve(kind.solver, denoiser, x_T, schedule, loop_rng, **options)
    x0 = solution.x0
    if sampler.clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return x0, solution.nfe
  return fn


def data_parallel_sampler(fn, mesh: Mesh, image_shape: tuple[int, int, int]):
  """Jits `fn` under `shard_map`: `run(params, rng, labels [N]) -> (images [N, H, W, C],
  nfe [devices])`.

  N must be a multiple of the mesh size; device i samples with `fold_in(rng, i)`.
  """
  def per_device(params, rng, labels):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    images, nfe = fn(params, rng, labels, (labels.shape[0],) + tuple(image_shape))
    return images, jnp.reshape(nfe, (1,))

  # check_vma=False: diffrax's adaptive loop (the 'ode' sampler) starts its carry from
  # unsharded constants, which the varying-axes check would refuse; nothing here communicates.
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                          out_specs=(P(AXIS), P(AXIS)), check_vma=False)
  jitted = jax.jit(sharded)

  def run(params, rng, labels):
    n = mesh.devices.size
    if labels.shape[0] % n:
      raise ValueError(f'number of samples per call {labels.shape[0]} must be a multiple of '
                       f'the device count {n}')
    labels = jax.device_put(np.asarray(labels, np.int32), NamedSharding(mesh, P(AXIS)))
    return jitted(params, rng, labels)
  return run


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255], rounding to the nearest level."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 `[N, H, W, C]` → one uint8 image `[rows·(H+pad)+pad, ncol·(W+pad)+pad, C]`."""
  n, h, w, c = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + k * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid
