"""The per-device training step, and the wrappers that run it data-parallel.

`train_step(state, batch, rng) -> (state, metrics)` is pure and runs on one device's share
of the global batch; gradients and metrics are averaged with `lax.pmean` over the 'data'
axis. It is bound to its fixed settings with `functools.partial` and then wrapped by
`shard_map` (`data_parallel_step`, what the trainer uses) or `pmap` (`pmap_step`).

Randomness: the step key is `fold_in(state.rng, step)`. Each example's timestep and noise
come from `fold_in(step_key, global_example_index)`, so they do not depend on how the batch
is split over devices or micro-batches; dropout uses `fold_in(step_key, device_index)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.process import consistency
from diffusion_jax.process import continuous
from diffusion_jax.process import edm
from diffusion_jax.process import flow_matching
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import score_matching
from diffusion_jax.training import distill as distill_lib
from diffusion_jax.training import timestep_sampler
from diffusion_jax.runtime.parallel import AXIS
from diffusion_jax.spec import DistillMethod, DistillSpec, ExperimentSpec, Objective
from diffusion_jax.spec import TimestepSampling
from diffusion_jax.training.state import TrainState, ema_update



@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The step's fixed settings, parsed (build it with `from_spec`)."""
  loss_type: gd.LossType = gd.LossType.MSE
  parameterization: gd.Parameterization = gd.Parameterization()
  snr_gamma: float | None = None
  importance_sampling: bool = False
  ema_decay: float = 0.9999
  ema_warmup: bool = False         # decay min(ema_decay, (1 + n) / (10 + n)) at update n
  grad_accum_steps: int = 1
  label_dropout: float = 0.0
  num_classes: int | None = None   # class-conditional: label `num_classes` is the null label
  # Score matching (objective dsm or ssm) at continuous t under `process`; 'ddpm': DDPM's
  # losses at discrete timesteps, and `process` is None.
  objective: Objective = Objective.DDPM
  process: continuous.Process | None = None
  # EDM (objective 'edm'): ln σ ~ N(p_mean, p_std²); σ_d is the process's.
  p_mean: float = -1.2
  p_std: float = 1.2
  # Flow matching (objective 'flow'): the density of t and the logit-normal's mean and std.
  t_density: flow_matching.TimeDensity = flow_matching.TimeDensity.UNIFORM
  t_mean: float = 0.0
  t_std: float = 1.0
  # EDM's EMA by half-life (None: ema_decay), with the global batch it counts images by.
  ema_halflife_kimg: float | None = None
  ema_rampup_ratio: float | None = None
  batch_size: int = 1
  # Distillation (spec.distill; None: none) and the teacher's process it runs on.
  distill: DistillSpec | None = None
  distill_process: continuous.Process | None = None

  def __post_init__(self):
    object.__setattr__(self, 'loss_type', gd.LossType.parse(self.loss_type))
    object.__setattr__(self, 'objective', Objective.parse(self.objective))
    if (self.objective is Objective.DDPM) != (self.process is None):
      raise ValueError(f'objective {self.objective.value!r} needs a process if and only if it '
                       "is not 'ddpm'")
    if self.grad_accum_steps < 1:
      raise ValueError(f'grad_accum_steps must be >= 1, got {self.grad_accum_steps}')
    if not 0.0 <= self.ema_decay < 1.0:   # 1 would freeze the EMA at the initial params
      raise ValueError(f'training.ema_decay must be in [0, 1), got {self.ema_decay}')
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f'label_dropout must be in [0, 1), got {self.label_dropout}')

  @classmethod
  def from_spec(cls, spec: ExperimentSpec) -> 'StepConfig':
    d, t = spec.diffusion, spec.training
    return cls(loss_type=d.loss_type, parameterization=d.parameterization,
               snr_gamma=d.snr_gamma,
               importance_sampling=d.timestep_sampling is TimestepSampling.IMPORTANCE,
               ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
               grad_accum_steps=t.grad_accum_steps,
               label_dropout=t.label_dropout, num_classes=spec.num_classes,
               objective=d.objective,
               process=d.make_process() if d.continuous_time else None,
               p_mean=d.p_mean, p_std=d.p_std, t_density=d.t_density, t_mean=d.t_mean,
               t_std=d.t_std, ema_halflife_kimg=t.ema_halflife_kimg,
               ema_rampup_ratio=t.ema_rampup_ratio, batch_size=t.batch_size,
               distill=spec.distill,
               distill_process=None if spec.distill is None else d.make_process())


def ema_decay(cfg: StepConfig, step: jax.Array) -> jax.Array | float:
  """The EMA decay of the update made by step `step` (0 for the first).

  With `ema_warmup`, TF's `ExponentialMovingAverage(num_updates=step)` rule (also diffusers'
  `EMAModel` default): min(decay, (1 + n) / (10 + n)), so the average forgets the
  initial parameters within the first few hundred steps instead of keeping decay^n of them.
  With `ema_halflife_kimg`, EDM's half-life in images (training/training_loop.py of NVlabs/edm).
  """
  if cfg.ema_halflife_kimg is not None:
    # EDM's: 0.5^(batch / half-life in images), the half-life at most ramp-up × n·batch, the
    # images seen before this update (so the first update copies the parameters).
    halflife = jnp.asarray(cfg.ema_halflife_kimg * 1000.0, jnp.float32)
    if cfg.ema_rampup_ratio is not None:
      seen = step.astype(jnp.float32) * cfg.batch_size
      halflife = jnp.minimum(halflife, seen * cfg.ema_rampup_ratio)
    return jnp.power(0.5, cfg.batch_size / jnp.maximum(halflife, 1e-8))
  if not cfg.ema_warmup:
    return cfg.ema_decay
  n = step.astype(jnp.float32)
  return jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))


def _per_example_randomness(rng, state, global_index, shape, diffusion, cfg: StepConfig):
  """t `[b]`, weights `[b]`, noise `[b, H, W, C]` and label-drop flags `[b]`, per example."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_index)  # [b] keys
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)            # [b, 3]
  if _distills(cfg):   # cd: the level n (int32); pd: the student's level t
    if cfg.distill.method is DistillMethod.CD:
      t = jax.vmap(lambda k: distill_lib.cd_level(k, cfg.distill.num_levels))(split[:, 0])
    else:
      k_steps = student_steps(cfg, state.step)
      t = jax.vmap(lambda k: distill_lib.pd_time(k, k_steps))(split[:, 0])
    weights = jnp.ones(t.shape, jnp.float32)
  elif cfg.objective is Objective.FLOW:   # t from the flow's density (reflow's too)
    p = cfg.process
    t = jax.vmap(lambda k: flow_matching.sample_time(
        k, (), cfg.t_density, p.t_min, p.t_max, cfg.t_mean, cfg.t_std))(split[:, 0])
    weights = jnp.ones(t.shape, jnp.float32)
  elif cfg.objective is Objective.EDM:   # σ itself, ln σ ~ N(p_mean, p_std²), float32
    t = jax.vmap(lambda k: edm.sample_sigma(k, (), cfg.p_mean, cfg.p_std))(split[:, 0])
    weights = jnp.ones(t.shape, jnp.float32)
  elif cfg.process is not None:   # continuous time: t ~ U(t_min, t_max), float32
    p = cfg.process
    t = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, p.t_min, p.t_max))(
        split[:, 0])
    weights = jnp.ones(t.shape, jnp.float32)
  elif cfg.importance_sampling:
    p = timestep_sampler.importance_probs(state.loss_history)
    t = jax.vmap(lambda k: jax.random.choice(k, diffusion.num_timesteps, p=p))(split[:, 0])
    weights = 1.0 / (diffusion.num_timesteps * p[t])
  else:
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, diffusion.num_timesteps))(split[:, 0])
    weights = jnp.ones(t.shape, jnp.float32)
  noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(split[:, 1])
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.label_dropout))(split[:, 2])
  if cfg.process is None and cfg.distill is None:
    t = t.astype(jnp.int32)
  return t, weights, noise, drop


def _distills(cfg: StepConfig) -> bool:
  """A cd or pd student, trained on its teacher's outputs (reflow trains a flow's own loss
  on the teacher's pairs, which come in the batch)."""
  return cfg.distill is not None and cfg.distill.method is not DistillMethod.REFLOW


def flow_terms(process: continuous.Process, denoise, x0, t, noise) -> dict[str, jax.Array]:
  """Flow matching's per-example loss `[b]`: the network `denoise(c_in·x_t,
  model_timestep(t))` read as the velocity u_θ, against ε − x₀ (`flow_matching.loss`)."""
  def velocity(x, tt):
    scale = process.input_scale(tt).reshape((-1,) + (1,) * (x.ndim - 1))
    return denoise(x * scale, process.model_timestep(tt))[..., :x.shape[-1]]
  per = flow_matching.loss(velocity, x0, t, noise)
  return dict(loss=per, mse=per, vb=jnp.zeros_like(per))


def student_steps(cfg: StepConfig, step: jax.Array) -> jax.Array:
  """pd: the student's step count K at training step `step` (int32 [])."""
  d = cfg.distill
  return distill_lib.pd_steps(step, d.start_steps, d.final_steps, d.steps_per_round)


def distill_loss(cfg: StepConfig, state: TrainState, student_fn, frozen_fn, micro
                 ) -> jax.Array:
  """The distillation loss per example `[b]`: `student_fn(x, t)` is the network with the
  trained params, `frozen_fn(params, x, t)` a network with other (teacher, target) params."""
  d, process = cfg.distill, cfg.distill_process
  mean_type = cfg.parameterization.mean_type
  as_denoiser = lambda fn: continuous.make_denoiser(process, fn, mean_type)
  # The teacher network is read as its own output type (in its spec); pd's later teachers are
  # students, read as the student's.
  teacher_fn = lambda x, t: frozen_fn(state.teacher_params, x, t)
  teacher = continuous.make_denoiser(process, teacher_fn, d.teacher_mean_type)
  if d.method is DistillMethod.PD and d.teacher_mean_type is not mean_type:
    first_round = state.step < d.steps_per_round
    as_student = as_denoiser(teacher_fn)
    as_teacher = teacher
    teacher = lambda x, t: jax.lax.cond(first_round, as_teacher, as_student, x, t)
  student = as_denoiser(student_fn)
  if d.method is DistillMethod.PD:
    k = student_steps(cfg, state.step)
    return distill_lib.pd_loss(student, teacher, process, micro['image'], micro['t'], k,
                               micro['noise'])
  wrap = lambda den: consistency.consistency_denoiser(den, process, d.sigma_data)
  target = wrap(as_denoiser(lambda x, t: frozen_fn(state.target_params, x, t)))
  times = distill_lib.cd_times(process, d.num_levels)            # [N], concrete
  n = micro['t']
  return distill_lib.cd_loss(wrap(student), target, teacher, process, micro['image'],
                             times[n], times[n + 1], micro['noise'], dist=d.distance,
                             huber_c=d.huber_c)


def _distill_after_update(cfg: StepConfig, state: TrainState, new_state: TrainState,
                          tx: optax.GradientTransformation) -> TrainState:
  """cd: the target network's EMA. pd: at the end of a round, the student (its EMA) becomes
  the teacher and the next round's starting point, with a fresh optimizer state."""
  d = cfg.distill
  if d.method is DistillMethod.CD:
    return new_state.replace(target_params=ema_update(state.target_params, new_state.params,
                                                      d.target_decay))
  ends_round = student_steps(cfg, new_state.step) < student_steps(cfg, state.step)

  def next_round(s):
    ema = s.ema_params
    return s.replace(params=ema, teacher_params=ema, opt_state=tx.init(ema))
  return jax.lax.cond(ends_round, next_round, lambda s: s, new_state)


def score_matching_terms(process: continuous.Process, denoise, mean_type, x0, t, noise, rng,
                         objective: Objective) -> dict[str, jax.Array]:
  """The per-example loss `[b]` of objective dsm or ssm, averaged over pixels like DDPM's.

  The network's output (ε, x₀, v or the score, `continuous.make_denoiser`) is read as the
  score s = −ε̂/σ(t). dsm: σ²·½‖s + z/σ‖² = ½‖ε̂ − z‖² at x_t = α x₀ + σ z. ssm: σ² times
  sliced score matching's estimate (one Rademacher projection, the variance-reduced form) of
  the perturbed marginal's Fisher divergence, up to a constant; it needs no z at all.
  """
  denoiser = continuous.make_denoiser(process, denoise, mean_type)
  dim = x0[0].size

  def score_fn(x, tt):
    sigma = process.sigma(tt)                                      # [b]
    return -denoiser(x, tt)[1] / sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))

  if objective is Objective.DSM:
    per = score_matching.dsm_loss_process(score_fn, process, x0, t, noise)
  else:
    x_t = process.q_sample(x0, t, noise)
    per = jnp.square(process.sigma(t)) * score_matching.ssm_loss(
        lambda x: score_fn(x, t), x_t, rng, variance_reduced=True)
  per = per / dim
  return dict(loss=per, mse=per, vb=jnp.zeros_like(per))


def classifier_terms(process: continuous.Process, logits_fn, x0, t, noise, labels
                     ) -> dict[str, jax.Array]:
  """A noise-conditional classifier's per-example cross-entropy `[b]` at x_t = α x₀ + σ z:
  `logits_fn(c_in·x_t, model_timestep(t)) -> [b, classes]`, fed as the denoising network is
  (`continuous.make_denoiser`), so that guidance reads it at the sampler's times. mse and vb
  are 0; accuracy is the top-1 hit."""
  x_t = process.q_sample(x0, t, noise)
  scale = process.input_scale(t).reshape((-1,) + (1,) * (x0.ndim - 1))
  logits = logits_fn(x_t * scale, process.model_timestep(t))             # [b, classes]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  zeros = jnp.zeros_like(ce)
  return dict(loss=ce, mse=zeros, vb=zeros,
              accuracy=(jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, diffusion: gd.GaussianDiffusion,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Args:
    state: the replicated `TrainState`.
    batch: `image` float32 `[b, H, W, C]` in [-1, 1] and `label` int32 `[b]`, where b is the
      per-device batch.
    rng: the step key, the same on every device.
  Returns:
    The new state and metrics averaged over the 'data' axis (loss, mse, vb, grad_norm,
    learning_rate).
  """
  images = batch['image']  # [b, H, W, C]
  chex.assert_rank(images, 4)
  b = images.shape[0]
  device = jax.lax.axis_index(AXIS)
  global_index = device * b + jnp.arange(b)
  t, weights, noise, drop = _per_example_randomness(rng, state, global_index, images.shape,
                                                    diffusion, cfg)
  if cfg.distill is not None and cfg.distill.method is DistillMethod.REFLOW:
    noise = batch['noise']   # the ε that the teacher's ODE took to this x₀ (`reflow.PairIterator`)
  labels = None
  if cfg.num_classes:
    labels = jnp.where(drop, cfg.num_classes, batch['label']).astype(jnp.int32)
  classifier = cfg.objective is Objective.CLASSIFIER
  if classifier:   # the targets; the network takes no label
    labels = batch['label'].astype(jnp.int32)
  dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), device)
  ssm_rng = jax.random.fold_in(jax.random.fold_in(rng, 0x55A), device)  # ssm's projections

  def loss_fn(params, micro):
    def denoise(x_t, tt):
      return model.apply({'params': params}, x_t, tt, y=micro['label'], train=True,
                         rngs={'dropout': jax.random.fold_in(dropout_rng, micro['index'])})
    if classifier:
      terms = classifier_terms(cfg.process, lambda x, tt: model.apply(
          {'params': params}, x, tt, train=True,
          rngs={'dropout': jax.random.fold_in(dropout_rng, micro['index'])}),
          micro['image'], micro['t'], micro['noise'], micro['label'])
    elif cfg.objective is Objective.FLOW:
      terms = flow_terms(cfg.process, denoise, micro['image'], micro['t'], micro['noise'])
    elif cfg.distill is not None:
      def frozen(params, x_t, tt):
        return model.apply({'params': params}, x_t, tt, y=micro['label'], train=False)
      per = distill_loss(cfg, state, denoise, frozen, micro)
      terms = dict(loss=per, mse=per, vb=jnp.zeros_like(per))
    elif cfg.objective is Objective.EDM:   # micro['t'] holds σ
      per = edm.loss(denoise, micro['image'], micro['t'], micro['noise'],
                     cfg.process.sigma_data)
      terms = dict(loss=per, mse=per, vb=jnp.zeros_like(per))
    elif cfg.process is not None:
      terms = score_matching_terms(
          cfg.process, denoise, cfg.parameterization.mean_type, micro['image'], micro['t'],
          micro['noise'], jax.random.fold_in(ssm_rng, micro['index']), cfg.objective)
    else:
      terms = gd.training_loss_terms(
          diffusion, denoise, micro['image'], micro['t'], micro['noise'],
          loss_type=cfg.loss_type, **cfg.parameterization.as_kwargs(), snr_gamma=cfg.snr_gamma)
    return jnp.mean(terms['loss'] * micro['weights']), terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # Differentiate a per-device copy of the params: under shard_map the gradient of replicated
  # params would otherwise already be summed over devices. The average is the pmean below.
  local_params = jax.lax.pcast(state.params, AXIS, to='varying')
  a = cfg.grad_accum_steps
  if b % a:
    raise ValueError(f'per-device batch {b} is not divisible by grad_accum_steps {a}')
  micro = dict(image=images, t=t, noise=noise, weights=weights, label=labels)
  micro = jax.tree.map(lambda x: x.reshape((a, b // a) + x.shape[1:]), micro)
  micro['index'] = jnp.arange(a)

  if a == 1:
    (_, terms), grads = grad_fn(local_params, jax.tree.map(lambda x: x[0], micro))
  else:
    def accumulate(grad_sum, m):
      (_, terms), g = grad_fn(local_params, m)
      return jax.tree.map(jnp.add, grad_sum, g), terms
    zeros = jax.tree.map(jnp.zeros_like, local_params)
    # Accelerators keep the loop, which holds the activations of one micro-batch at a time.
    grads, terms = jax.lax.scan(accumulate, zeros, micro, unroll=_unroll_loops())
    grads = jax.tree.map(lambda g: g / a, grads)
    terms = jax.tree.map(lambda x: x.reshape(b), terms)

  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  loss_history = state.loss_history
  if cfg.importance_sampling:
    all_t = jax.lax.all_gather(t, AXIS).reshape(-1)
    all_losses = jax.lax.all_gather(jax.lax.stop_gradient(terms['loss']), AXIS).reshape(-1)
    varying = jax.lax.pcast(loss_history, AXIS, to='varying')
    loss_history = timestep_sampler.update_history(varying, all_t, all_losses)
    # Every device computed the same update; pmax (exact on equal values) marks it replicated.
    loss_history = jax.lax.pmax(loss_history, AXIS)

  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_decay(cfg, state.step)),
      loss_history=loss_history)
  if _distills(cfg):   # cd, pd (reflow keeps no teacher or target)
    new_state = _distill_after_update(cfg, state, new_state, tx)
  metrics = dict(loss=jnp.mean(terms['loss'] * weights), mse=jnp.mean(terms['mse']),
                 vb=jnp.mean(terms['vb']))
  if classifier:
    metrics['accuracy'] = jnp.mean(terms['accuracy'])
  metrics = jax.lax.pmean(metrics, AXIS)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return new_state, metrics


def _unroll_loops() -> bool:
  """Whether a `lax.scan` over steps or micro-batches is unrolled: on CPU only. Inside a while
  loop XLA:CPU runs the kernel gradients of the convolutions on its generic convolution, about
  30x slower than the library kernels it uses elsewhere (docs/benchmarks.md; the digits step
  ran 6x slower rolled)."""
  return jax.default_backend() == 'cpu'


def _step_key(state: TrainState) -> jax.Array:
  return jax.random.fold_in(state.rng, state.step)


def data_parallel_step(step_fn: Callable, mesh: Mesh, steps_per_call: int = 1) -> Callable:
  """`update(state, batch) -> (state, metrics)`: `step_fn` under `shard_map` over `mesh`.

  The state is replicated (P()), the batch sharded over 'data' on its leading axis; the
  state's buffers are donated. A state whose step counter is replicated over `mesh` is taken
  to be placed as a whole (the trainer's); any other is placed first.

  With `steps_per_call` k > 1, one call runs k steps (a `lax.scan` over the batches): `batch`
  is k batches stacked, [k, b, ...] (sharded over 'data' on axis 1), and every metric comes
  back per step, [k]. Each step is the same function of the state and its batch as with k = 1
  (its key is `fold_in(rng, step)`); only the host's dispatches are k times fewer. (Equal to
  float32 rounding, not bit for bit: XLA fuses the k-step program differently.)
  """
  if (isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int)
      or steps_per_call < 1):
    raise ValueError(f'steps_per_call must be a positive integer, got {steps_per_call!r}')
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()))
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(AXIS) if steps_per_call == 1 else P(None, AXIS))

  def one(state, batch):
    return sharded(state, batch, _step_key(state))

  if steps_per_call == 1:
    run = one
  else:
    def run(state, batches):
      chex.assert_axis_dimension(jax.tree.leaves(batches)[0], 0, steps_per_call)
      # Accelerators keep the loop: one step's program, compiled once.
      return jax.lax.scan(one, state, batches, unroll=_unroll_loops())  # metrics: {name: [k]}

  jitted = jax.jit(run, donate_argnums=(0,))

  def update(state, batch):
    # The trainer's state already lives on the mesh: its step counter says so, and then the
    # state is passed as it is. (A `jax.device_put` of the whole state, even as a no-op, cost
    # 9.7 ms a step for the digits model's 732 arrays on this CPU.) Anything else is placed.
    placed = isinstance(state.step, jax.Array) and state.step.sharding == replicated
    return jitted(state if placed else jax.device_put(state, replicated),
                  jax.device_put(batch, split))

  # Compiling ahead of the first call (placed arguments): the call then reuses the program.
  update.compile = lambda state, batch: jitted.lower(state, batch).compile()
  update.batch_sharding = split
  return update


def pmap_step(step_fn: Callable) -> Callable:
  """`update(state, batch) -> (state, metrics)` with `jax.pmap`: state stacked over devices
  (`flax.jax_utils.replicate`), batch `[devices, b, ...]`."""
  mapped = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))

  def update(state, batch):
    key = _step_key(jax.tree.map(lambda x: x[0], state))
    return mapped(state, batch, key)
  return update
