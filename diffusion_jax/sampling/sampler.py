"""Sampling from a trained U-Net: the model as a denoiser (with classifier-free guidance),
one sampler function per `SamplerConfig`, and its data-parallel run. No IO."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.process import continuous
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.runtime import parallel
from diffusion_jax.sampling import samplers
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
