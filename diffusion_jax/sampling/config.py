"""Which sampler, and with which options: `SamplerConfig`, the one parsed value that sample.py,
the training-time grid and the evaluation read. No IO, nothing of the model."""

from __future__ import annotations

import dataclasses

from diffusion_jax.sampling import solvers


# Every sampler, one member per entry of the registry `solvers.SOLVERS`.
SamplerKind = solvers.SolverKind

# The options that belong to some samplers only (the registry says whose), and their owners.
_OWNERS: dict[str, list[str]] = {}
for _name, _info in solvers.SOLVERS.items():
  for _field in _info.options:
    _OWNERS.setdefault(_field, []).append(_name)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample: the one parsed value that sample.py, the training-time grid and the
  evaluation read. Strings are parsed on construction (`SamplerConfig('dpmpp_2m', steps=20)`).

  steps: the levels the model sees for ddpm and ddim, the steps of the other fixed-step
    solvers (None: all T); not for 'ode'.
  eta: DDIM only. churn: Heun's S_churn. snr: the PC corrector's target signal-to-noise.
  step_schedule: the time steps ('time_uniform', 'logsnr', 'karras', 'respaced'; None: the
    sampler's default). rtol: the adaptive 'ode' solve's tolerance (rtol = atol).
  Which sampler takes which option is the registry's (`solvers.SOLVERS`); an option set away
  from its default for a sampler that does not take it is a one-line ValueError.
  clip_denoised: clip x̂₀ to [-1, 1] at each model evaluation (ε̂ follows from it).
  langevin_steps, langevin_step_size: ald's steps per noise level (T) and its ε (the step at
    level i is ε·σ_i²/σ_L²); `steps` is then the number of levels less one.
  """
  kind: SamplerKind = SamplerKind.DDPM
  steps: int | None = None
  # (and, not a field: `info`, the sampler's `solvers.SolverInfo`, set on construction)
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
    object.__setattr__(self, 'info', solvers.SOLVERS[kind.value])  # its registry entry
    if self.steps is not None:
      if (isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1):
        raise ValueError(f'sampler steps must be a positive integer (or None: all T), got '
                         f'{self.steps!r}')
      if self.info.adaptive:
        raise ValueError(f"the {kind.value!r} sampler chooses its own steps: set rtol, not "
                         'steps')
    if self.eta < 0:
      raise ValueError(f'eta must be >= 0, got {self.eta}')
    if self.guidance_scale < 0:
      raise ValueError(f'guidance_scale must be >= 0, got {self.guidance_scale}')
    if self.step_schedule is not None:
      if self.info.adaptive:
        raise ValueError(f'step_schedule applies to the fixed-step samplers, not {kind.value!r}')
      object.__setattr__(self, 'step_schedule', solvers.ScheduleKind.parse(self.step_schedule))
    if self.churn < 0:
      raise ValueError(f'churn must be >= 0, got {self.churn}')
    if not self.snr > 0:
      raise ValueError(f'snr must be > 0, got {self.snr}')
    if not 0 < self.rtol < 1:
      raise ValueError(f'rtol must be in (0, 1), got {self.rtol}')
    if (isinstance(self.langevin_steps, bool) or int(self.langevin_steps) != self.langevin_steps
        or self.langevin_steps < 1):
      raise ValueError(f'langevin_steps must be a positive integer, got {self.langevin_steps!r}')
    if not self.langevin_step_size > 0:
      raise ValueError(f'langevin_step_size must be > 0, got {self.langevin_step_size!r}')
    for field, owners in _OWNERS.items():
      default = SamplerConfig.__dataclass_fields__[field].default
      if getattr(self, field) != default and field not in self.info.options:
        raise ValueError(f'{field} applies to the {" and ".join(owners)} sampler'
                         f'{"s" if len(owners) > 1 else ""} only, not {kind.value!r}')

  def solver_options(self) -> dict:
    """The keyword arguments of the solver that this config's options give (registry's map)."""
    return {kwarg: getattr(self, field) for field, kwarg in self.info.options.items()}

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

  def schedule_for(self, process) -> 'solvers.ScheduleKind':
    """The step schedule on `process`: the one set, else the sampler's default ('respaced',
    the default of ddpm and ddim, needs a VP process of T steps: elsewhere 'logsnr', and
    'trailing' on the flow, where ddim is then Euler in t down to t = 0; a
    'respaced' set explicitly stays, and `solvers.step_schedule` refuses it off VP)."""
    if self.step_schedule is not None:
      return self.step_schedule
    kind = self.info.schedule
    if kind is solvers.ScheduleKind.RESPACED and process.num_timesteps is None:
      # On the flow, ddim over the trailing levels is Euler in t down to t = 0.
      return (solvers.ScheduleKind.TRAILING if process.kind is solvers.ProcessKind.FLOW
              else solvers.ScheduleKind.LOGSNR)
    return kind

  @property
  def schedule(self) -> 'solvers.ScheduleKind':
    """The step schedule on a VP process of T steps, the default filled in."""
    return self.step_schedule or self.info.schedule

  def check_steps(self, num_timesteps: int) -> None:
    """Raises a one-line ValueError unless the steps fit a process of T = `num_timesteps`."""
    if self.steps is not None and self.steps > num_timesteps:
      raise ValueError(f'sampler steps must be in [1, {num_timesteps}] (the model\'s T), got '
                       f'{self.steps}')

  def num_evaluations(self, num_timesteps: int) -> int | None:
    """Model evaluations per sample (a guided one evaluates a doubled batch); None for the
    adaptive 'ode', which reports its own."""
    steps = self.steps or num_timesteps
    if self.info.adaptive:
      return None
    if self.info.levels:
      return steps
    return solvers.num_evaluations(self.kind, steps, steps_per_level=self.langevin_steps)

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
    shown = self.step_schedule or (None if self.info.levels else self.schedule)
    return f'{self.kind.value}, {steps}{extra}' + (f' ({shown.value})' if shown else '')

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
# (diffusion_jax/sampling/flags.py) and the config groups `training` and `eval` give them:
# those of all samplers, then those the registry gives to some.
OPTIONS = ('steps', 'step_schedule', 'guidance_scale', *_OWNERS)
