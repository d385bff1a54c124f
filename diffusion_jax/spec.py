"""The experiment spec: one frozen, typed description of a run, built once from its config.

    spec = ExperimentSpec.from_config(config, dataset_info)   # strings parsed here, once
    model = spec.model.make()                                  # the U-Net
    diffusion = spec.diffusion.make()                          # the GaussianDiffusion

Training writes it to `WORKDIR/spec.json` (see `workdir.py`) and sampling and evaluation read
it back from there alone: the spec holds the dataset facts they need (image shape, classes),
so a workdir samples without its dataset. Nothing below the spec rebuilds it from strings.

Fields in `RESUMABLE` (the run's length and cadence, its sample grid and periodic evaluation,
where the data lives, the optimizer's and EMA's settings) may change when a run is resumed;
any other difference from the stored spec means another model or objective, and
`differences` names it. No IO here.
"""

from __future__ import annotations

import dataclasses
import math
import enum
import typing
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
import numpy as np

from diffusion_jax.process import continuous
from diffusion_jax.process import flow_matching
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import solvers
from diffusion_jax.process import schedules
from diffusion_jax.data import input_pipeline
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.options import Option

# U-Net fields that come from the data, the variance type and the compute dtype, not from
# `config.model`.
DERIVED_MODEL_FIELDS = ('out_ch', 'num_classes', 'dtype', 'param_dtype', 'time_scale', 'head')
COMPUTE_DTYPES = ('float32', 'bfloat16')


def default_model_fields() -> dict[str, Any]:
  """The U-Net fields a config sets, with UNetConfig's defaults (the paper's CIFAR-10
  model); fields that default to None are typed placeholders, so a flag can set them."""
  hints = typing.get_type_hints(UNetConfig)
  out = {}
  for k, v in UNetConfig().to_dict().items():
    if k in DERIVED_MODEL_FIELDS:
      continue
    if v is None:
      (kind,) = [a for a in typing.get_args(hints[k]) if a is not type(None)]
      v = ml_collections.config_dict.placeholder(kind)
    out[k] = tuple(v) if isinstance(v, list) else v
  return out


class TimestepSampling(Option):
  UNIFORM = 'uniform'
  IMPORTANCE = 'importance'  # by the L_vlb history (Nichol & Dhariwal 2021)

  @classmethod
  def _what(cls):
    return 'timestep_sampler'


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


def _multiple_of_steps_per_call(value: int, name: str, k: int) -> None:
  if value % k:
    raise ValueError(f'{name}={value} must be a multiple of training.steps_per_call={k}: the '
                     'loop logs, checkpoints, samples, evaluates and stops only between calls')


def _non_negative_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
  return int(value)


# ------------------------------------------------------------------------------------------
# The parts.
# ------------------------------------------------------------------------------------------


class Objective(Option):
  """What the network is trained to minimise (Song et al. 2021 fit all three to one model)."""
  DDPM = 'ddpm'  # DDPM's losses over discrete timesteps (loss_type): the 'vp' process only
  DSM = 'dsm'    # denoising score matching over continuous t, weighting λ = σ² (Song & Ermon)
  SSM = 'ssm'    # sliced score matching of the perturbed marginals (Song et al. 2019)
  EDM = 'edm'    # Karras et al. 2022: log-normal σ, λ(σ), the preconditioned D ('edm' process)
  # A noise-conditional classifier p(y | x_t) of the process (for classifier guidance, sampling
  # with --classifier): cross-entropy of the data's labels at t ~ U(t_min, t_max).
  CLASSIFIER = 'classifier'
  # Flow matching (Lipman et al. 2023): the velocity ε − x₀ of the 'flow' process, t drawn from
  # diffusion.t_density (docs/flow.md).
  FLOW = 'flow'

  @classmethod
  def _what(cls):
    return 'diffusion.objective'


@dataclasses.dataclass(frozen=True)
class DataSpec:
  dataset: str                        # TFDS name
  image_shape: tuple[int, int, int]   # (H, W, C)
  num_classes: int                    # the dataset's classes (0: no labels)
  data_dir: str | None                # where the TFDS data lives (None: TFDS's default)
  random_flip: bool
  # How the training stream is read (input_pipeline.DataPipeline); specs written before the
  # field existed were read with grain.
  pipeline: input_pipeline.DataPipeline = input_pipeline.DataPipeline.GRAIN

  def __post_init__(self):
    object.__setattr__(self, 'image_shape', tuple(int(d) for d in self.image_shape))
    object.__setattr__(self, 'pipeline', input_pipeline.DataPipeline.parse(self.pipeline))


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """The forward process and the training objective."""
  schedule: str
  num_timesteps: int
  beta_start: float
  beta_end: float
  zero_terminal_snr: bool
  parameterization: gd.Parameterization
  loss_type: gd.LossType
  snr_gamma: float | None
  timestep_sampling: TimestepSampling
  # The score-based family (docs/score_based.md). Specs written before these fields read as
  # the defaults: DDPM's process and losses.
  process: continuous.ProcessKind = continuous.ProcessKind.VP
  objective: Objective = Objective.DDPM
  sigma_min: float = 0.01   # the 've' and 'edm' processes: σ(t) = σ_min (σ_max/σ_min)^t
  sigma_max: float = 50.0
  # EDM (Karras et al. 2022; docs/edm.md): the data's scale σ_d, and ln σ ~ N(p_mean, p_std²)
  # in training. Specs written before these fields read as the paper's values.
  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2
  # Flow matching (objective 'flow'; docs/flow.md): the density of t, and the logit-normal's
  # mean and std. Specs written before these fields read as uniform.
  t_density: flow_matching.TimeDensity = flow_matching.TimeDensity.UNIFORM
  t_mean: float = 0.0
  t_std: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, 'loss_type', gd.LossType.parse(self.loss_type))
    object.__setattr__(self, 'timestep_sampling',
                       TimestepSampling.parse(self.timestep_sampling))
    object.__setattr__(self, 'process', continuous.ProcessKind.parse(self.process))
    object.__setattr__(self, 'objective', Objective.parse(self.objective))
    object.__setattr__(self, 'sigma_min', float(self.sigma_min))
    object.__setattr__(self, 'sigma_max', float(self.sigma_max))
    object.__setattr__(self, 't_density', flow_matching.TimeDensity.parse(self.t_density))
    for name in ('sigma_data', 'p_mean', 'p_std', 't_mean', 't_std'):
      object.__setattr__(self, name, float(getattr(self, name)))
    self._check_score_based()
    if self.snr_gamma is not None:
      if self.parameterization.mean_type is gd.MeanType.XPREV:
        raise ValueError('snr_gamma (min-SNR weighting) is defined for mean_type eps, v and '
                         "xstart, not 'xprev'")
      if not self.snr_gamma > 0:
        raise ValueError(f'snr_gamma must be > 0 (or None), got {self.snr_gamma}')
    self.betas()  # validates the schedule's name, T and end points

  def betas(self) -> np.ndarray:
    return schedules.get_beta_schedule(
        self.schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
        zero_terminal_snr=self.zero_terminal_snr)

  def make(self) -> gd.GaussianDiffusion:
    return gd.GaussianDiffusion.from_betas(self.betas())

  @property
  def continuous_time(self) -> bool:
    """Trained at continuous t (dsm, ssm) rather than at DDPM's discrete timesteps."""
    return self.objective is not Objective.DDPM

  def make_process(self) -> continuous.Process:
    """The continuous-time process: the discrete schedule read as a VP-SDE for 'vp'."""
    if self.process is continuous.ProcessKind.VP:
      return continuous.VPProcess.from_diffusion(self.make())
    if self.process is continuous.ProcessKind.VE:
      return continuous.make_process('ve', sigma_min=self.sigma_min, sigma_max=self.sigma_max)
    if self.process is continuous.ProcessKind.EDM:
      return continuous.make_process('edm', sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                     sigma_data=self.sigma_data)
    return continuous.make_process(self.process)

  def _check_score_based(self) -> None:
    kind, obj = self.process.value, self.objective.value
    if self.process is not continuous.ProcessKind.VP and not self.continuous_time:
      raise ValueError(f"diffusion.objective 'ddpm' (DDPM's losses) is defined for the 'vp' "
                       f"process only, not {kind!r}: use 'dsm' or 'ssm'")
    if self.process in (continuous.ProcessKind.VE, continuous.ProcessKind.EDM):
      self.make_process()  # checks sigma_min < sigma_max (and sigma_data > 0)
    is_edm = self.objective is Objective.EDM
    if is_edm != (self.process is continuous.ProcessKind.EDM):
      raise ValueError("diffusion.objective 'edm' and diffusion.process 'edm' go together, not "
                       f'objective {obj!r} with process {kind!r}')
    is_flow = self.objective is Objective.FLOW
    if is_flow and self.process is not continuous.ProcessKind.FLOW:
      raise ValueError("diffusion.objective 'flow' trains the velocity of the 'flow' process "
                       f'(x_t = (1 − t) x₀ + t ε): set diffusion.process \'flow\', not {kind!r}')
    if not is_flow and (self.t_density is not flow_matching.TimeDensity.UNIFORM
                        or (self.t_mean, self.t_std) != (0.0, 1.0)):
      raise ValueError(f'diffusion.t_density, t_mean and t_std are the flow objective\'s; '
                       f"objective {obj!r} keeps t_density 'uniform', t_mean 0, t_std 1")
    if not (math.isfinite(self.t_mean) and math.isfinite(self.t_std) and self.t_std > 0):
      raise ValueError(f'diffusion.t_mean must be finite and diffusion.t_std > 0, got '
                       f't_mean={self.t_mean!r}, t_std={self.t_std!r}')
    mt = self.parameterization.mean_type
    if mt is gd.MeanType.FLOW and self.process is not continuous.ProcessKind.FLOW:
      raise ValueError("diffusion.mean_type 'flow' (the velocity ε − x₀) needs diffusion.process "
                       f"'flow', not {kind!r}")
    if not self.continuous_time:
      return
    if is_edm and mt is not gd.MeanType.EDM:
      raise ValueError(f"diffusion.objective 'edm' trains EDM's preconditioned F: set "
                       f"diffusion.mean_type 'edm', not {mt.value!r}")
    if is_flow and mt is not gd.MeanType.FLOW:
      raise ValueError(f"diffusion.objective 'flow' trains the velocity ε − x₀: set "
                       f"diffusion.mean_type 'flow', not {mt.value!r}")
    allowed = continuous.CONTINUOUS_MEAN_TYPES + (
        (gd.MeanType.FLOW,) if self.process is continuous.ProcessKind.FLOW else ())
    if not is_edm and mt not in allowed:
      allowed = ', '.join(repr(m.value) for m in allowed)
      raise ValueError(f'diffusion.mean_type {mt.value!r} has no meaning for objective {obj!r} '
                       f'on process {kind!r}; allowed: {allowed}')
    if is_edm and not (math.isfinite(self.p_std) and self.p_std > 0
                       and math.isfinite(self.p_mean)):
      raise ValueError(f'diffusion.p_mean must be finite and diffusion.p_std > 0, got '
                       f'p_mean={self.p_mean!r}, p_std={self.p_std!r}')
    if self.parameterization.var_type.is_learned:
      raise ValueError(f'diffusion.var_type {self.parameterization.var_type.value!r} is learned '
                       f"by DDPM's L_vlb: objective {obj!r} needs a fixed variance "
                       "('fixedlarge' or 'fixedsmall')")
    if self.loss_type is not gd.LossType.MSE:
      raise ValueError(f'diffusion.loss_type {self.loss_type.value!r} is a DDPM loss: objective '
                       f"{obj!r} needs loss_type 'mse'")
    if self.snr_gamma is not None or self.timestep_sampling is not TimestepSampling.UNIFORM:
      raise ValueError(f'diffusion.snr_gamma and timestep_sampler=importance are DDPM options, '
                       f'not for objective {obj!r}')

  def check_sampler(self, sampler: 'sampler_config.SamplerConfig') -> None:
    """A one-line ValueError where `sampler` has no meaning for this process."""
    processes = sampler.info.processes
    if self.process not in processes:
      allowed = ', '.join(p.value for p in processes)
      raise ValueError(f'sampler {sampler.kind.value!r} is defined for the {allowed} process '
                       f'only, not {self.process.value!r}')
    if self.process is continuous.ProcessKind.VP:
      sampler.check_steps(self.num_timesteps)
    elif sampler.step_schedule is solvers.ScheduleKind.RESPACED:
      raise ValueError("step_schedule 'respaced' places the steps on DDPM's integer timesteps: "
                       f"it needs the 'vp' process, not {self.process.value!r}")


class DistillMethod(Option):
  CD = 'cd'   # consistency distillation (Song et al. 2023)
  PD = 'pd'   # progressive distillation (Salimans & Ho 2022)
  REFLOW = 'reflow'   # rectified flow's reflow (Liu et al. 2023): a flow on the teacher's pairs

  @classmethod
  def _what(cls):
    return 'distill.method'


class Distance(Option):
  """cd's distance between the student's and the target's x̂₀ (LPIPS means nothing at 8×8)."""
  L2 = 'l2'                      # mean over pixels of the squared difference
  PSEUDO_HUBER = 'pseudo_huber'  # √(‖a − b‖² + c²) − c (Song & Dhariwal 2023)

  @classmethod
  def _what(cls):
    return 'distill.distance'


# The parts of a teacher's spec that a student must share: its network and process are the
# teacher's (it starts from the teacher's weights and samples the teacher's process). The
# network's output type is the student's own (`STUDENT_OWN`): a student of one to four steps
# needs a well-conditioned one (v or EDM's F), which an ε teacher is not at high noise. So is
# a flow's density of training times (reflow trains its own).
TEACHER_SHARED = ('model.', 'diffusion.', 'data.image_shape', 'data.num_classes')
STUDENT_OWN = ('diffusion.parameterization.mean_type', 'diffusion.t_density', 'diffusion.t_mean',
               'diffusion.t_std')


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """A student distilled from a trained workdir (docs/distillation.md).

  The student's network and process are the teacher's (`TEACHER_SHARED`); it starts from the
  teacher's EMA weights at checkpoint `teacher_step`, read as the student's own output type
  (diffusion.mean_type: v for the digits recipes; the teacher's is in its spec). `teacher_spec` is the
  teacher's whole spec.json, so the student's workdir samples without the teacher.

  cd: `num_levels` Karras levels (ρ = 7) of σ̃, one teacher Heun step between adjacent ones, a
    target network θ⁻ ← μθ⁻ + (1 − μ)θ with μ = `target_decay`, the distance `distance`
    (pseudo_huber's c: `huber_c`, None: 0.00054√d), and the boundary-preserving f with σ_d =
    `sigma_data`.
  pd: a student of `start_steps` DDIM steps on the 'trailing' levels learns two teacher steps
    in one; every `steps_per_round` training steps it becomes the teacher and its step count
    halves, down to `final_steps`.
  """
  method: DistillMethod
  teacher: str                    # the teacher's workdir, as given
  teacher_step: int               # the teacher checkpoint whose EMA weights were taken
  teacher_spec: Mapping[str, Any]  # the teacher's spec.json
  num_levels: int = 18
  distance: Distance = Distance.L2
  huber_c: float | None = None
  target_decay: float = 0.95
  sigma_data: float = 0.5
  start_steps: int = 8
  final_steps: int = 1
  steps_per_round: int = 1000
  # reflow: `num_pairs` pairs (ε, x₀ = the teacher's PF-ODE from ε) made once by sampler
  # `pair_sampler` with `pair_steps` (a deterministic solver), kept in the workdir.
  num_pairs: int = 5000
  pair_sampler: str = 'dpmpp_2m'
  pair_steps: int = 20

  def __post_init__(self):
    object.__setattr__(self, 'method', DistillMethod.parse(self.method))
    object.__setattr__(self, 'distance', Distance.parse(self.distance))
    if not isinstance(self.teacher, str) or not self.teacher:
      raise ValueError(f'distill.teacher must be a workdir path, got {self.teacher!r}')
    if isinstance(self.num_levels, bool) or not isinstance(self.num_levels, int) or (
        self.num_levels < 2):
      raise ValueError(f'distill.num_levels must be an integer >= 2, got {self.num_levels!r}')
    if not (isinstance(self.target_decay, (int, float)) and 0 <= self.target_decay < 1):
      raise ValueError(f'distill.target_decay must be in [0, 1), got {self.target_decay!r}')
    if not (isinstance(self.sigma_data, (int, float)) and math.isfinite(self.sigma_data)
            and self.sigma_data > 0):
      raise ValueError(f'distill.sigma_data must be a finite number > 0, got '
                       f'{self.sigma_data!r}')
    if self.huber_c is not None and not (isinstance(self.huber_c, (int, float))
                                         and math.isfinite(self.huber_c) and self.huber_c > 0):
      raise ValueError(f'distill.huber_c must be a finite number > 0 (or None), got '
                       f'{self.huber_c!r}')
    for name in ('start_steps', 'final_steps', 'steps_per_round', 'num_pairs', 'pair_steps'):
      _positive_int(getattr(self, name), f'distill.{name}')
    if self.pair_sampler not in PAIR_SAMPLERS:
      raise ValueError(f'distill.pair_sampler {self.pair_sampler!r} must be a deterministic '
                       f'PF-ODE solver: one of {", ".join(PAIR_SAMPLERS)}')
    ratio = self.start_steps // self.final_steps
    if self.start_steps % self.final_steps or ratio & (ratio - 1):
      raise ValueError(f'distill.start_steps ({self.start_steps}) must be distill.final_steps '
                       f'({self.final_steps}) times a power of 2: each round halves the steps')

  @property
  def num_rounds(self) -> int:
    """pd's rounds: start_steps, start_steps/2, …, final_steps."""
    return int(math.log2(self.start_steps // self.final_steps)) + 1

  def parsed_teacher_spec(self) -> 'ExperimentSpec':
    return ExperimentSpec.from_json(self.teacher_spec)

  @property
  def teacher_mean_type(self) -> gd.MeanType:
    """The teacher network's output type."""
    return gd.MeanType.parse(self.teacher_spec['diffusion']['parameterization']['mean_type'])

  def pair_sampler_config(self) -> sampler_config.SamplerConfig:
    """reflow: the teacher's ODE solve that joins each ε to its x₀."""
    return sampler_config.SamplerConfig.create(self.pair_sampler, steps=self.pair_steps)


# reflow's pair samplers: deterministic PF-ODE solvers with a fixed number of steps.
PAIR_SAMPLERS = ('ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_3m')


def _distill_of(c: ml_collections.ConfigDict, teacher: tuple['ExperimentSpec', int] | None
                ) -> DistillSpec | None:
  """The config's `distill` group as a DistillSpec (None: no teacher named)."""
  d = c.get('distill')
  if d is None or d.get('teacher') is None:
    if teacher is not None:
      raise ValueError('a teacher spec was given but the config names no distill.teacher')
    return None
  if teacher is None:
    raise ValueError(f'distill.teacher={d.teacher!r}: the teacher\'s spec is needed (the '
                     'trainer reads it from the workdir)')
  teacher_spec, teacher_step = teacher
  if teacher_spec.distill is not None and teacher_spec.distill.method is DistillMethod.CD:
    raise ValueError(f'distill.teacher {d.teacher!r} is a consistency model (distilled with '
                     "'cd'): distil from a diffusion model")
  return DistillSpec(
      method=d.get('method', 'cd'), teacher=str(d.teacher), teacher_step=int(teacher_step),
      teacher_spec=teacher_spec.to_json(), num_levels=d.get('num_levels', 18),
      distance=d.get('distance', 'l2'), huber_c=d.get('huber_c', None),
      target_decay=d.get('target_decay', 0.95), sigma_data=d.get('sigma_data', 0.5),
      start_steps=d.get('start_steps', 8), final_steps=d.get('final_steps', 1),
      steps_per_round=d.get('steps_per_round', 1000), num_pairs=d.get('num_pairs', 5000),
      pair_sampler=d.get('pair_sampler', 'dpmpp_2m'), pair_steps=d.get('pair_steps', 20))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam with linear warm-up and global-norm clipping (the DDPM recipe)."""
  learning_rate: float = 2e-4
  warmup_steps: int = 5000
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    def bad(name, allowed):
      value = getattr(self, name)
      return ValueError(f'optimizer.{name} must be {allowed}, got {value!r}')
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    if not (finite(self.learning_rate) and self.learning_rate > 0):
      raise bad('learning_rate', 'a finite number > 0')
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      raise bad('warmup_steps', 'an integer >= 0')
    if self.grad_clip is not None and not (finite(self.grad_clip) and self.grad_clip >= 0):
      raise bad('grad_clip', 'a finite number >= 0 (0 or None: no clipping)')
    for name in ('b1', 'b2'):
      if not (finite(getattr(self, name)) and 0 <= getattr(self, name) < 1):
        raise bad(name, 'in [0, 1)')
    if not (finite(self.eps) and self.eps > 0):
      raise bad('eps', 'a finite number > 0')

  def learning_rate_schedule(self) -> optax.Schedule:
    if self.warmup_steps <= 0:
      return optax.constant_schedule(self.learning_rate)
    return optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)

  def make(self) -> optax.GradientTransformation:
    parts = []
    if self.grad_clip and self.grad_clip > 0:
      parts.append(optax.clip_by_global_norm(self.grad_clip))
    parts.append(optax.adam(self.learning_rate_schedule(), b1=self.b1, b2=self.b2, eps=self.eps))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
  """Settings of the update step that shape what is learned."""
  batch_size: int            # global, over all devices and processes
  ema_decay: float
  grad_accum_steps: int
  label_dropout: float       # class-conditional: p(null label) for classifier-free guidance
  ema_warmup: bool = False   # decay min(ema_decay, (1 + n) / (10 + n)) at step n
  # EDM's EMA (Karras et al. 2022): a half-life in thousands of images instead of ema_decay,
  # decay 0.5^(batch / half-life), the half-life at most ramp-up × images seen (None: none).
  ema_halflife_kimg: float | None = None
  ema_rampup_ratio: float | None = None

  def __post_init__(self):
    _positive_int(self.batch_size, 'training.batch_size')
    _positive_int(self.grad_accum_steps, 'training.grad_accum_steps')
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f'training.ema_decay must be in [0, 1), got {self.ema_decay}')
    for name in ('ema_halflife_kimg', 'ema_rampup_ratio'):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                    and value > 0):
        raise ValueError(f'training.{name} must be a finite number > 0 (or None), got '
                         f'{value!r}')
    if self.ema_halflife_kimg is None and self.ema_rampup_ratio is not None:
      raise ValueError('training.ema_rampup_ratio ramps up the EMA half-life: it needs '
                       'training.ema_halflife_kimg')
    if self.ema_halflife_kimg is not None and self.ema_warmup:
      raise ValueError('training.ema_warmup and training.ema_halflife_kimg are two EMA '
                       'schedules: set one')
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f'training.label_dropout must be in [0, 1), got {self.label_dropout}')


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The run's length and cadence and its sample grid: free to change on resume."""
  num_train_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  sample_every_steps: int            # 0: no sample grids
  num_samples: int
  sampler: sampler_config.SamplerConfig    # for the grid
  time_budget_s: float = 0.0         # > 0: also stop (and checkpoint) after this wall time
  steps_per_call: int = 1            # steps per dispatch (a lax.scan): less host overhead

  def __post_init__(self):
    if not (isinstance(self.time_budget_s, (int, float)) and math.isfinite(self.time_budget_s)
            and self.time_budget_s >= 0):
      raise ValueError('training.time_budget_s must be a finite number of seconds >= 0 (0: '
                       f'no budget), got {self.time_budget_s!r}')
    for name in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
                 'keep_checkpoints', 'num_samples'):
      _positive_int(getattr(self, name), f'training.{name}')
    _non_negative_int(self.sample_every_steps, 'training.sample_every_steps')
    k = _positive_int(self.steps_per_call, 'training.steps_per_call')
    for name in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
                 'sample_every_steps'):
      _multiple_of_steps_per_call(getattr(self, name), f'training.{name}', k)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Evaluation during training (free to change on resume)."""
  every_steps: int                   # 0: none
  num_samples: int                   # for FID; 0: none
  bpd_examples: int                  # test examples for bits/dim; 0: none
  sampler: sampler_config.SamplerConfig
  inception_weights: str | None

  def __post_init__(self):
    for name in ('every_steps', 'num_samples', 'bpd_examples'):
      _non_negative_int(getattr(self, name), f'eval.{name}')


def _sampler_of(group: ml_collections.ConfigDict) -> sampler_config.SamplerConfig:
  """The sampler of config group `training` or `eval`: `sampler`, `sample_steps` and the
  options of `sampler_config.OPTIONS` that the group sets (configs older than them set none)."""
  options = {k: group.get(k) for k in sampler_config.OPTIONS if k != 'steps'}
  return sampler_config.SamplerConfig.create(group.get('sampler', 'ddim'), steps=group.sample_steps,
                                       **{k: v for k, v in options.items() if v is not None})


# ------------------------------------------------------------------------------------------
# The spec.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
  seed: int
  data: DataSpec
  model: UNetConfig
  diffusion: DiffusionSpec
  optimizer: OptimizerConfig
  training: TrainingSpec
  run: RunSpec
  eval: EvalSpec
  distill: DistillSpec | None = None   # a student distilled from a teacher workdir

  def __post_init__(self):
    _multiple_of_steps_per_call(self.eval.every_steps, 'eval.every_steps',
                                self.run.steps_per_call)
    if self.distill is not None:
      self._check_distill()
    if self.is_classifier:
      self._check_classifier()

  @property
  def is_classifier(self) -> bool:
    """A noise-conditional classifier (objective 'classifier'), not a diffusion model."""
    return self.diffusion.objective is Objective.CLASSIFIER

  def _check_classifier(self) -> None:
    """One-line errors for what a classifier run cannot do."""
    if self.run.sample_every_steps or self.eval.every_steps:
      raise ValueError("diffusion.objective 'classifier' trains a classifier, which draws no "
                       'samples: set training.sample_every_steps=0 and eval.every_steps=0')
    if self.distill is not None:
      raise ValueError("diffusion.objective 'classifier' has nothing to distil: drop distill")
    if self.model.head != 'classifier' or self.model.out_ch != self.data.num_classes:
      raise ValueError(f"diffusion.objective 'classifier' needs a classifier head of "
                       f'{self.data.num_classes} logits, got head {self.model.head!r} with '
                       f'{self.model.out_ch}')

  def _check_distill(self) -> None:
    """One-line errors where the student cannot be the teacher's, or the method has no
    meaning for its process."""
    d = self.distill
    teacher = d.parsed_teacher_spec()
    if teacher.is_classifier:
      raise ValueError(f'distill.teacher {d.teacher!r} is a classifier, not a diffusion model')
    fixed, resumable = differences(teacher, self)
    shared = [row for row in fixed + resumable
              if row[0].startswith(TEACHER_SHARED) and row[0] not in STUDENT_OWN]
    if shared:
      raise ValueError(f'distill.teacher {d.teacher!r} differs from the student in '
                       f'{describe_differences(shared[:4])}: a student has its teacher\'s '
                       'network, process and data shape')
    mt = self.parameterization.mean_type
    if mt not in continuous.CONTINUOUS_MEAN_TYPES + (gd.MeanType.EDM, gd.MeanType.FLOW):
      raise ValueError(f'diffusion.mean_type {mt.value!r} has no denoiser to distil; a '
                       "student's output is 'eps', 'xstart', 'v', 'score', 'edm' or 'flow'")
    is_flow = self.diffusion.objective is Objective.FLOW
    if d.method is DistillMethod.REFLOW and not is_flow:
      raise ValueError(f"distill.method 'reflow' trains a flow on its teacher's pairs: the "
                       f"teacher must be a flow (diffusion.objective 'flow'), not "
                       f'{self.diffusion.objective.value!r}')
    if d.method is not DistillMethod.REFLOW and is_flow:
      raise ValueError(f'distill.method {d.method.value!r} of a flow teacher (diffusion.objective '
                       "'flow') is not supported: use distill.method 'reflow'")
    if d.method is DistillMethod.REFLOW and self.num_classes:
      raise ValueError("distill.method 'reflow' of a class-conditional teacher is not "
                       'supported: its pairs carry no labels')
    if d.method is DistillMethod.REFLOW:
      self.diffusion.check_sampler(d.pair_sampler_config())
    if d.method is DistillMethod.PD:
      if self.diffusion.process is not continuous.ProcessKind.VP:
        raise ValueError(f"distill.method 'pd' steps DDIM on t in (0, 1] down to the data: "
                         f"it needs the 'vp' process, not {self.diffusion.process.value!r}")
      if 2 * d.start_steps > self.diffusion.num_timesteps:
        raise ValueError(f'distill.start_steps={d.start_steps}: the teacher takes twice as many '
                         f'steps, at most the process\'s T={self.diffusion.num_timesteps}')

  @property
  def consistency_sigma_data(self) -> float | None:
    """σ_d of a consistency model (the cd student), None for any other model."""
    if self.distill is not None and self.distill.method is DistillMethod.CD:
      return self.distill.sigma_data
    return None

  def check_sampler(self, sampler: 'sampler_config.SamplerConfig') -> None:
    """The diffusion's checks, and the consistency sampler for consistency models only."""
    if self.is_classifier:
      raise ValueError("this workdir is a noise-conditional classifier (diffusion.objective "
                       "'classifier'): it draws no samples; guide a diffusion model with "
                       '--classifier WORKDIR')
    self.diffusion.check_sampler(sampler)
    if sampler.info.consistency_model and self.consistency_sigma_data is None:
      raise ValueError(f'sampler {sampler.kind.value!r} samples consistency models (a workdir '
                       "distilled with distill.method 'cd'); this model is not one")

  @property
  def num_classes(self) -> int | None:
    """Classes of a class-conditional model (label `num_classes` is the null label); None for
    an unconditional one."""
    return self.model.num_classes

  @property
  def parameterization(self) -> gd.Parameterization:
    return self.diffusion.parameterization

  # ---- Building from a config. ----------------------------------------------------------

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  info: input_pipeline.ImageDatasetInfo,
                  teacher: tuple['ExperimentSpec', int] | None = None) -> 'ExperimentSpec':
    """Parses and checks every field of `config` (one-line ValueErrors); `info` gives the
    dataset facts (from `input_pipeline.dataset_info`). `teacher`: (spec, checkpoint step) of
    the workdir that `config.distill.teacher` names, read by the caller."""
    c = config
    param = gd.Parameterization(c.diffusion.mean_type, c.diffusion.var_type)
    dtype = c.training.compute_dtype
    if dtype not in COMPUTE_DTYPES:
      raise ValueError(f'unknown training.compute_dtype {dtype!r}; allowed: '
                       f'{", ".join(COMPUTE_DTYPES)}')
    fields = {k: v for k, v in c.model.to_dict().items() if k != 'class_conditional'}
    derived = sorted(set(fields) & set(DERIVED_MODEL_FIELDS))
    if derived:
      raise ValueError(f'model.{derived[0]} is derived (from the data, diffusion.var_type, '
                       'diffusion.num_timesteps and training.compute_dtype); remove it from the '
                       'config')
    num_classes = None
    if c.model.class_conditional:
      if not info.num_classes:
        raise ValueError(f'model.class_conditional=True but dataset {info.name!r} has no '
                         'labels')
      num_classes = info.num_classes
    d = c.diffusion
    process = continuous.ProcessKind.parse(d.get('process', 'vp'))
    # The network's noise coordinate is `process.model_timestep(t)`: the timestep T·t − 1 for
    # vp, log σ for ve, 999·t for sub-VP; time_scale brings it to the embedding's range.
    time_scale = (float(d.num_timesteps) if process is continuous.ProcessKind.VP
                  else float(continuous.make_process(process).time_scale))
    classifier = d.get('objective', 'ddpm') == Objective.CLASSIFIER.value
    if classifier and (not info.num_classes or num_classes):
      raise ValueError(f"diffusion.objective 'classifier' predicts the labels of dataset "
                       f'{info.name!r}: it needs a labelled dataset and '
                       'model.class_conditional=False')
    out_ch = info.num_classes if classifier else param.out_channels(info.image_shape[-1])
    model = UNetConfig.from_dict({**fields, 'out_ch': out_ch, 'num_classes': num_classes,
                                  'dtype': dtype, 'time_scale': time_scale,
                                  'head': 'classifier' if classifier else 'denoiser'})
    diffusion = DiffusionSpec(
        schedule=d.schedule, num_timesteps=_positive_int(d.num_timesteps,
                                                         'diffusion.num_timesteps'),
        beta_start=float(d.beta_start), beta_end=float(d.beta_end),
        zero_terminal_snr=bool(d.zero_terminal_snr), parameterization=param,
        loss_type=d.loss_type,
        snr_gamma=None if d.snr_gamma is None else float(d.snr_gamma),
        timestep_sampling=d.timestep_sampler, process=process,
        objective=d.get('objective', 'ddpm'), sigma_min=d.get('sigma_min', 0.01),
        sigma_max=d.get('sigma_max', 50.0), sigma_data=d.get('sigma_data', 0.5),
        p_mean=d.get('p_mean', -1.2), p_std=d.get('p_std', 1.2),
        t_density=d.get('t_density', 'uniform'), t_mean=d.get('t_mean', 0.0),
        t_std=d.get('t_std', 1.0))
    t = c.training
    training = TrainingSpec(
        batch_size=t.batch_size, ema_decay=float(t.ema_decay),
        ema_warmup=bool(t.get('ema_warmup', False)), grad_accum_steps=t.grad_accum_steps,
        ema_halflife_kimg=t.get('ema_halflife_kimg', None),
        ema_rampup_ratio=t.get('ema_rampup_ratio', None),
        label_dropout=float(t.label_dropout) if num_classes else 0.0)
    run = RunSpec(
        num_train_steps=t.num_train_steps, log_every_steps=t.log_every_steps,
        checkpoint_every_steps=t.checkpoint_every_steps, keep_checkpoints=t.keep_checkpoints,
        sample_every_steps=t.sample_every_steps, num_samples=t.num_samples,
        sampler=_sampler_of(t),
        time_budget_s=t.get('time_budget_s', 0.0), steps_per_call=t.get('steps_per_call', 1))
    e = c.eval
    evaluation = EvalSpec(
        every_steps=e.every_steps, num_samples=e.num_samples, bpd_examples=e.bpd_examples,
        sampler=_sampler_of(e),
        inception_weights=e.get('inception_weights'))
    data = DataSpec(dataset=info.name, image_shape=info.image_shape,
                    num_classes=info.num_classes,
                    data_dir=None if c.data.data_dir is None else str(c.data.data_dir),
                    random_flip=bool(c.data.random_flip),
                    pipeline=c.data.get('pipeline', 'grain'))
    spec = cls(seed=int(c.seed), data=data, model=model, diffusion=diffusion,
               optimizer=OptimizerConfig(**c.optimizer.to_dict()), training=training, run=run,
               eval=evaluation, distill=_distill_of(c, teacher))
    for s in () if spec.is_classifier else (run.sampler, evaluation.sampler):
      spec.check_sampler(s)
    return spec

  # ---- Building the objects it describes. -----------------------------------------------

  def init_params(self, rng: jax.Array):
    """Fresh U-Net parameters (`jax.eval_shape` of this is every checkpoint's shape)."""
    model = self.model.make()
    x = jnp.zeros((1,) + self.data.image_shape, jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    return model.init({'params': rng}, x, t, y=y, train=False)['params']

  # ---- JSON. ----------------------------------------------------------------------------

  def to_json(self) -> dict[str, Any]:
    return _to_json(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'ExperimentSpec':
    """The inverse of `to_json`; raises ValueError for a spec this version cannot read."""
    try:
      diff = dict(d['diffusion'])
      diff['parameterization'] = gd.Parameterization(**diff['parameterization'])
      run, ev = dict(d['run']), dict(d['eval'])
      run['sampler'] = sampler_config.SamplerConfig.from_dict(run['sampler'])
      ev['sampler'] = sampler_config.SamplerConfig.from_dict(ev['sampler'])
      distill = d.get('distill')
      return cls(seed=int(d['seed']), data=DataSpec(**d['data']),
                 model=UNetConfig.from_dict(d['model']), diffusion=DiffusionSpec(**diff),
                 optimizer=OptimizerConfig(**d['optimizer']),
                 training=TrainingSpec(**d['training']), run=RunSpec(**run),
                 eval=EvalSpec(**ev),
                 distill=None if distill is None else DistillSpec(**distill))
    except (KeyError, TypeError) as e:
      raise ValueError(f'not an experiment spec of this version ({type(e).__name__}: {e})'
                       ) from None


def _to_json(x):
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    if hasattr(x, 'to_dict'):
      return _to_json(x.to_dict())
    return {f.name: _to_json(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, enum.Enum):
    return x.value
  if isinstance(x, (tuple, list)):
    return [_to_json(v) for v in x]
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  if isinstance(x, np.generic):
    return x.item()
  return x


# ------------------------------------------------------------------------------------------
# Comparing specs on resume.
# ------------------------------------------------------------------------------------------

# Dotted prefixes of the fields that may differ from the stored spec when a run resumes: how
# long and how it is logged, sampled and evaluated, where the data lives, and how it is
# optimised (a changed learning rate or EMA decay is a common, deliberate step; an optimizer
# whose state has another structure is refused when its checkpoint is restored). Everything
# else defines the model or the objective. (Another data.pipeline resumes at the same batch
# of another order.) The batch size is not here: the saved data
# position counts batches, so another batch size would resume elsewhere in the stream.
RESUMABLE = ('run.', 'eval.', 'data.data_dir', 'data.pipeline', 'optimizer.', 'training.ema_decay',
             'training.ema_warmup', 'training.ema_halflife_kimg', 'training.ema_rampup_ratio',
             'training.grad_accum_steps')


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# Fields added to DiffusionSpec after specs were first written, whose defaults keep an older
# spec's meaning (DDPM's process and losses): absent from a stored spec, they read as these.
_DIFFUSION_DEFAULTS = ('process', 'objective', 'sigma_min', 'sigma_max', 'sigma_data', 'p_mean',
                       'p_std', 't_density', 't_mean', 't_std')
# DistillSpec fields added after distillation itself (reflow's), read as their defaults.
_DISTILL_DEFAULTS = ('num_pairs', 'pair_sampler', 'pair_steps')


def _normalised(spec: ExperimentSpec | Mapping[str, Any]) -> Mapping[str, Any]:
  """The JSON of a spec, with `_DIFFUSION_DEFAULTS` and `_DISTILL_DEFAULTS` filled in where a
  stored one lacks them."""
  if isinstance(spec, ExperimentSpec):
    return spec.to_json()
  spec = {'distill': None, **spec}   # specs written before distillation: none
  if not isinstance(spec.get('diffusion'), Mapping):
    return spec
  defaults = {f.name: _to_json(f.default) for f in dataclasses.fields(DiffusionSpec)
              if f.name in _DIFFUSION_DEFAULTS}
  spec = {**spec, 'diffusion': {**defaults, **spec['diffusion']}}
  if isinstance(spec['distill'], Mapping):
    defaults = {f.name: _to_json(f.default) for f in dataclasses.fields(DistillSpec)
                if f.name in _DISTILL_DEFAULTS}
    spec['distill'] = {**defaults, **spec['distill']}
  return spec


def differences(old: ExperimentSpec | Mapping[str, Any], new: ExperimentSpec | Mapping[str, Any]
                ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
  """(fixed, resumable): the fields that differ, each (dotted name, old value, new value).

  `fixed` are those that define the model or the objective (a resume must refuse them);
  `resumable` those in `RESUMABLE`.
  """
  a = _flatten(_normalised(old))
  b = _flatten(_normalised(new))
  fixed, resumable = [], []
  for name in sorted(set(a) | set(b)):
    if a.get(name, '<absent>') != b.get(name, '<absent>'):
      row = (name, a.get(name, '<absent>'), b.get(name, '<absent>'))
      (resumable if name.startswith(RESUMABLE) else fixed).append(row)
  return fixed, resumable


def describe_differences(rows: list[tuple[str, Any, Any]]) -> str:
  """'diffusion.parameterization.mean_type 'eps' -> 'v', model.ch 32 -> 64'."""
  return ', '.join(f'{name} {old!r} -> {new!r}' for name, old, new in rows)
