"""Which sampler, and with which options: `SamplerConfig`, the one parsed value that sample.py,
the training-time grid and the evaluation read. No IO, nothing of the model."""

from __future__ import annotations

import dataclasses
import enum

from diffusion_jax.sampling import solvers


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
# (diffusion_jax/sampling/flags.py) and the config groups `training` and `eval` give them.
OPTIONS = ('steps', 'eta', 'step_schedule', 'churn', 'snr', 'rtol', 'guidance_scale',
           'langevin_steps', 'langevin_step_size')
