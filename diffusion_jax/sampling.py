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
from diffusion_jax import samplers

AXIS = parallel.AXIS


class SamplerKind(enum.Enum):
  DDPM = 'ddpm'  # ancestral; respaced when steps < T
  DDIM = 'ddim'


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample: the one parsed value that sample.py, the training-time grid and the
  evaluation read. Strings are parsed on construction (`SamplerConfig('ddim', steps=50)`)."""
  kind: SamplerKind = SamplerKind.DDPM
  steps: int | None = None        # None: all T steps
  eta: float = 0.0                # DDIM only
  clip_denoised: bool = True
  guidance_scale: float = 0.0     # classifier-free guidance weight w (0: none)

  def __post_init__(self):
    if not isinstance(self.kind, SamplerKind):
      try:
        object.__setattr__(self, 'kind', SamplerKind(self.kind))
      except ValueError:
        allowed = ', '.join(k.value for k in SamplerKind)
        raise ValueError(f'unknown sampler {self.kind!r}; allowed: {allowed}') from None
    if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps
                                   or self.steps < 1):
      raise ValueError(f'sampler steps must be a positive integer (or None: all T), got '
                       f'{self.steps!r}')
    if self.eta < 0:
      raise ValueError(f'eta must be >= 0, got {self.eta}')
    if self.eta and self.kind is not SamplerKind.DDIM:
      raise ValueError(f'eta applies to the ddim sampler only, not {self.kind.value!r}')
    if self.guidance_scale < 0:
      raise ValueError(f'guidance_scale must be >= 0, got {self.guidance_scale}')

  @classmethod
  def create(cls, kind: str | SamplerKind = 'ddpm', **kwargs) -> 'SamplerConfig':
    return cls(kind=kind, **kwargs)

  def check_steps(self, num_timesteps: int) -> None:
    """Raises a one-line ValueError unless the steps fit a process of T = `num_timesteps`."""
    if self.steps is not None and self.steps > num_timesteps:
      raise ValueError(f'sampler steps must be in [1, {num_timesteps}] (the model\'s T), got '
                       f'{self.steps}')

  def to_dict(self) -> dict:
    return dict(kind=self.kind.value, steps=self.steps, eta=self.eta,
                clip_denoised=self.clip_denoised, guidance_scale=self.guidance_scale)

  @classmethod
  def from_dict(cls, d) -> 'SamplerConfig':
    return cls(**d)


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
              num_classes: int | None = None):
  """`fn(params, rng, labels, x_shape) -> images [B, H, W, C]` in [-1, 1] on one device.

  Respacing happens here, on the host, once.
  """
  sampler.check_steps(diffusion.num_timesteps)
  mean_type, var_type = parameterization.mean_type, parameterization.var_type
  steps = sampler.steps or diffusion.num_timesteps
  d = diffusion
  if sampler.kind is SamplerKind.DDPM and steps != diffusion.num_timesteps:
    d = samplers.respace(diffusion, samplers.space_timesteps(diffusion.num_timesteps, steps))

  def fn(params, rng, labels, x_shape):
    denoise = make_denoise_fn(model, params, labels if num_classes else None,
                              guidance_scale=sampler.guidance_scale,
                              num_classes=num_classes)
    if sampler.kind is SamplerKind.DDIM:
      return samplers.ddim_sample_loop(d, denoise, x_shape, rng, num_steps=steps,
                                       eta=sampler.eta, mean_type=mean_type,
                                       clip_denoised=sampler.clip_denoised)
    return samplers.p_sample_loop(d, denoise, x_shape, rng, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=sampler.clip_denoised)
  return fn


def data_parallel_sampler(fn, mesh: Mesh, image_shape: tuple[int, int, int]):
  """Jits `fn` under `shard_map`: `run(params, rng, labels [N]) -> images [N, H, W, C]`.

  N must be a multiple of the mesh size; device i samples with `fold_in(rng, i)`.
  """
  def per_device(params, rng, labels):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    return fn(params, rng, labels, (labels.shape[0],) + tuple(image_shape))

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                          out_specs=P(AXIS))
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
