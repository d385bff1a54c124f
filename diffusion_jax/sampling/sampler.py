"""Sampling from a trained U-Net: the model as a denoiser (with classifier-free guidance),
one sampler function per `SamplerConfig`, and its data-parallel run. No IO."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.process import consistency as consistency_lib
from diffusion_jax.process import continuous
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.runtime import parallel
from diffusion_jax.sampling import controllable
from diffusion_jax.sampling import solvers
from diffusion_jax.sampling.config import SamplerConfig, SamplerKind

AXIS = parallel.AXIS


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


def schedule_of(sampler: SamplerConfig, process: continuous.Process) -> solvers.StepSchedule:
  """The levels that `sampler` visits on `process`, computed once on the host (concrete even
  inside a `jit`, given a concrete process): `steps` levels for ddpm and ddim (default: all T,
  on DDPM's integer timesteps), `steps` steps for the other solvers, the two ends for 'ode'."""
  info = sampler.info
  kind = sampler.schedule_for(process)
  steps = sampler.steps or process.num_timesteps or info.default_steps
  with jax.ensure_compile_time_eval():
    if info.adaptive:
      return solvers.step_schedule(process, 1, kind)
    if info.levels:
      return solvers.level_schedule(process, steps, kind)
    return solvers.step_schedule(process, steps, kind)


def _recording(denoiser: continuous.Denoiser, record) -> continuous.Denoiser:
  """`denoiser` that also hands every evaluation's (t [B], x, x̂₀) to the host function
  `record`, in order (a trajectory callback: what the model saw and predicted)."""
  def recorded(x, t):
    out = denoiser(x, t)
    jax.debug.callback(record, t, x, out[0], ordered=True)
    return out
  return recorded


def check_consistency(sampler: SamplerConfig, consistency_sigma_data: float | None) -> None:
  """A one-line ValueError for a consistency-model sampler on any other model."""
  if sampler.info.consistency_model and consistency_sigma_data is None:
    raise ValueError(f'sampler {sampler.kind.value!r} samples consistency models (a workdir '
                     "distilled with distill.method 'cd'); this model is not one: use another "
                     '--sampler')


def model_denoiser(denoise_fn: gd.DenoiseFn, process: continuous.Process, *,
                   sampler: SamplerConfig, parameterization: gd.Parameterization,
                   record=None, consistency_sigma_data: float | None = None,
                   guide=None) -> continuous.Denoiser:
  """A model's `denoise_fn(x_t, timesteps) -> output` as the solvers' denoiser: its output
  converted to (x̂₀, ε̂) (`continuous.make_denoiser`), x̂₀ clipped when `sampler` says so,
  with the variance output for a ddpm chain of a learned-variance model.

  `consistency_sigma_data`: a consistency model's σ_d (its denoiser is then the
  boundary-preserving f of `process.consistency`); None for any other model. `guide`: a
  denoiser adapter applied before the clipping (classifier guidance,
  `controllable.classifier_guided`)."""
  check_consistency(sampler, consistency_sigma_data)
  with_variance = sampler.info.uses_variance and parameterization.var_type.is_learned
  denoiser = continuous.make_denoiser(process, denoise_fn, parameterization.mean_type,
                                      with_variance=with_variance)
  if consistency_sigma_data is not None:
    denoiser = consistency_lib.consistency_denoiser(denoiser, process, consistency_sigma_data)
  if guide is not None:
    denoiser = guide(denoiser)
  if sampler.clip_denoised:
    denoiser = continuous.clip_x0(process, denoiser)
  return denoiser if record is None else _recording(denoiser, record)


def sample(denoise_fn: gd.DenoiseFn, process: continuous.Process, shape, rng: jax.Array, *,
           sampler: SamplerConfig, parameterization: gd.Parameterization,
           x_init: jax.Array | None = None, record=None,
           schedule: solvers.StepSchedule | None = None,
           consistency_sigma_data: float | None = None, guide=None
           ) -> tuple[jax.Array, jax.Array]:
  """Samples `[*shape]` from a model's `denoise_fn(x_t, timesteps)` with any registered
  sampler: (x₀ in [-1, 1] when clipping, model evaluations per sample int32 []).

  The one sampling path. `process` is the model's (`VPProcess.from_diffusion(d)` for a DDPM);
  the start is `x_init` or a prior draw from the first half of `split(rng)`, and the solver
  draws from the second. `record(t, x, x0_hat)`: see `_recording`. `schedule`: the levels,
  when already computed (`schedule_of`). jit-safe with `process`, `sampler` and
  `parameterization` fixed (closed over). `consistency_sigma_data`, `guide`: see
  `model_denoiser`.
  """
  denoiser = model_denoiser(denoise_fn, process, sampler=sampler,
                            parameterization=parameterization, record=record,
                            consistency_sigma_data=consistency_sigma_data, guide=guide)
  options = _options(sampler, parameterization)
  init_rng, loop_rng = jax.random.split(rng)
  x_T = process.prior_sample(init_rng, tuple(shape), jnp.float32) if x_init is None else x_init
  schedule = schedule_of(sampler, process) if schedule is None else schedule
  solution = solvers.solve(sampler.kind, denoiser, x_T, schedule, loop_rng, **options)
  x0 = jnp.clip(solution.x0, -1.0, 1.0) if sampler.clip_denoised else solution.x0
  return x0, solution.nfe


def _options(sampler: SamplerConfig, parameterization: gd.Parameterization) -> dict:
  """The solver's keyword options: the sampler's, and the model's variance for ddpm."""
  options = sampler.solver_options()
  if sampler.info.uses_variance:
    options['variance'] = parameterization.var_type
  return options


def encode(denoise_fn: gd.DenoiseFn, process: continuous.Process, x0: jax.Array, *,
           sampler: SamplerConfig, parameterization: gd.Parameterization) -> jax.Array:
  """The deterministic encoder x₀ → x at t = 1: the sampler's solve run upwards over its own
  levels, so that `sample(..., x_init=encode(x0))` with the same sampler returns ≈ x₀.

  A first-order (DDIM) step lifts x₀ to the lowest level with ε̂ of the model there; then the
  solver runs over the reversed levels (for ddim: Song et al.'s encoder, S evaluations for S
  levels). Deterministic samplers only: ddim with η = 0, euler, heun without churn, dpmpp_*.
  """
  info = sampler.info
  if sampler.kind.value not in ('ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_3m') or any(
      sampler.solver_options().values()):
    raise ValueError(f'encoding runs a deterministic solve upwards: use ddim (eta 0), euler, '
                     f'heun (churn 0), dpmpp_2m or dpmpp_3m, not {sampler.describe()!r}')
  denoiser = model_denoiser(denoise_fn, process, sampler=sampler,
                            parameterization=parameterization)
  sched = schedule_of(sampler, process)
  with jax.ensure_compile_time_eval():
    up = solvers.StepSchedule(process=process, t=sched.t[::-1])  # lowest level first
  t0 = jnp.full((x0.shape[0],), up.t[0], up.t.dtype)
  _, eps = denoiser(x0, t0)
  bc = lambda c: jnp.reshape(c, (-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  x = bc(process.alpha(t0)) * x0 + bc(process.sigma(t0)) * eps
  return info.fn(denoiser, x, up, None)


def sample_fn(model: nn.Module, diffusion: gd.GaussianDiffusion, *,
              parameterization: gd.Parameterization, sampler: SamplerConfig,
              num_classes: int | None = None, process: continuous.Process | None = None,
              consistency_sigma_data: float | None = None,
              classifier: nn.Module | None = None, classifier_scale: float = 0.0,
              control: controllable.Control | None = None):
  """`fn(params, rng, labels, x_shape, x_init=None, images=None, masks=None) ->
  (images [B, H, W, C] in [-1, 1], nfe)` on one device; nfe (int32 []) counts the model
  evaluations per sample.

  `classifier`: a noise-conditional classifier of `process` (objective 'classifier'), whose
  s·∇ log p(labels | x_t) guides every step (s = `classifier_scale`); `params` is then the
  pair (model params, classifier params). `control`: inpainting (`images` the known images,
  `masks` 1 on their known pixels) or image-to-image (`images` the inputs) instead of
  sampling from the prior; see `controllable`.

  `process`: the model's process (`DiffusionSpec.make_process`); None reads `diffusion` as a
  VP process of its T steps. What the sampler cannot do on it (ald on vp, a parameterisation
  without a denoiser, the consistency sampler on another model) is a one-line ValueError
  here, on the host. `consistency_sigma_data`: see `model_denoiser`.
  """
  check_consistency(sampler, consistency_sigma_data)
  if process is None:
    process = continuous.VPProcess.from_diffusion(diffusion)
  if process.kind not in sampler.info.processes:
    raise ValueError(f'sampler {sampler.kind.value!r} is defined for the '
                     f'{", ".join(p.value for p in sampler.info.processes)} process only, not '
                     f'{process.kind.value!r}')
  if process.num_timesteps is not None:
    sampler.check_steps(process.num_timesteps)
  continuous.parse_continuous_mean_type(parameterization.mean_type)
  schedule = schedule_of(sampler, process)  # once, on the host: a bad one is refused here
  if control is not None:
    control.check(sampler)

  def fn(params, rng, labels, x_shape, x_init=None, images=None, masks=None):
    guide = None
    if classifier is not None:
      params, classifier_params = params
      log_prob = controllable.classifier_log_prob(
          lambda x, n: classifier.apply({'params': classifier_params}, x, n, train=False),
          process, labels)
      guide = lambda den: controllable.classifier_guided(den, process, log_prob,
                                                         classifier_scale)
    denoise = make_denoise_fn(model, params, labels if num_classes else None,
                              guidance_scale=sampler.guidance_scale, num_classes=num_classes)
    if control is None:
      return sample(denoise, process, x_shape, rng, sampler=sampler,
                    parameterization=parameterization, x_init=x_init, schedule=schedule,
                    consistency_sigma_data=consistency_sigma_data, guide=guide)
    denoiser = model_denoiser(denoise, process, sampler=sampler,
                              parameterization=parameterization,
                              consistency_sigma_data=consistency_sigma_data, guide=guide)
    solution = control.run(denoiser, schedule, images, masks, rng, kind=sampler.kind,
                           **_options(sampler, parameterization))
    x0 = jnp.clip(solution.x0, -1.0, 1.0) if sampler.clip_denoised else solution.x0
    if control.inpainting:   # the known pixels exactly, clipped or not
      x0 = masks * images + (1.0 - masks) * x0
    return x0, solution.nfe
  return fn


def data_parallel_control(fn, mesh: Mesh):
  """Jits a `sample_fn` with a `control` under `shard_map`: `run(params, rng, labels [N],
  images [N, H, W, C], masks [N, H, W, C]) -> (images [N, H, W, C], nfe [devices])`, split
  over the devices as `data_parallel_sampler` does (masks: ones for image-to-image)."""
  def per_device(params, rng, labels, images, masks):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    out, nfe = fn(params, rng, labels, images.shape, images=images, masks=masks)
    return out, jnp.reshape(nfe, (1,))

  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                          out_specs=(P(AXIS), P(AXIS)), check_vma=False)
  jitted = jax.jit(sharded)

  def run(params, rng, labels, images, masks):
    n = mesh.devices.size
    if labels.shape[0] % n:
      raise ValueError(f'number of images per call {labels.shape[0]} must be a multiple of '
                       f'the device count {n}')
    put = lambda a, dtype: jax.device_put(np.asarray(a, dtype), NamedSharding(mesh, P(AXIS)))
    return jitted(params, rng, put(labels, np.int32), put(images, np.float32),
                  put(masks, np.float32))
  return run


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
