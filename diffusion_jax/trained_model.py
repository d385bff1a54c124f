"""A trained model from a workdir: restore its EMA parameters, sample from it, write samples.

    trained = load_ema_params('/tmp/digits')                  # latest checkpoint
    images, labels, nfe = generate(trained, SamplerConfig('dpmpp_2m', steps=20),
                              num_samples=64, rng=jax.random.PRNGKey(0))

A workdir stands alone here: its `spec.json` (the experiment spec) gives the model, the
process and the image shape, and only the checkpoint's `ema` item is restored. No dataset,
no optimizer, nothing of the training code.

`sample_to_dir` is what `sample.py` runs: samples, a grid, and optionally the progressive
chain and a DDIM-latent interpolation, written to one folder. Sampling is data-parallel
over every device (`sampler_lib.data_parallel_sampler`); batch i uses `fold_in(rng, i)` and
device j of it `fold_in(., j)`, so samples depend on the seed, batch size and device count.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.storage import checkpointing
from diffusion_jax.runtime import compilation
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.runtime import parallel
from diffusion_jax.storage import paths
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.storage import images as images_lib
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.storage.images import save_png
from diffusion_jax.spec import ExperimentSpec

DEFAULT_MAX_BATCH = 256


# ------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkdirInfo:
  """What a workdir holds, read without restoring anything."""
  workdir: epath.Path
  spec: ExperimentSpec
  step: int                              # the checkpoint that will be restored

  @property
  def num_classes(self) -> int | None:
    """Classes of a class-conditional model; None for an unconditional one."""
    return self.spec.num_classes

  @property
  def num_timesteps(self) -> int:
    return self.spec.diffusion.num_timesteps


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A U-Net with its EMA parameters (replicated over `mesh`) and its diffusion process."""
  workdir: epath.Path | None
  step: int
  spec: ExperimentSpec
  model: Any                             # diffusion_jax.models.UNet
  diffusion: gd.GaussianDiffusion
  ema_params: Any
  mesh: jax.sharding.Mesh

  @property
  def num_classes(self) -> int | None:
    return self.spec.num_classes

  @property
  def parameterization(self) -> gd.Parameterization:
    return self.spec.parameterization

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.spec.data.image_shape

  @classmethod
  def from_spec(cls, spec: ExperimentSpec, ema_params, mesh: jax.sharding.Mesh, *,
                step: int = 0, workdir: epath.Path | None = None) -> 'TrainedModel':
    return cls(workdir=workdir, step=step, spec=spec, model=spec.model.make(),
               diffusion=spec.diffusion.make(), ema_params=ema_params, mesh=mesh)


def read_workdir(workdir, step: int | None = None) -> WorkdirInfo:
  """The spec and checkpoint step of a training workdir (nothing restored).

  Raises FileNotFoundError when `workdir` is not a training workdir or has no checkpoint
  (or not checkpoint `step`).
  """
  path = paths.as_path(workdir)
  spec = workdir_lib.read_spec(path)
  # The trainer's rule for the latest good checkpoint (damaged ones: a warning line each).
  step = checkpointing.latest_good_step(path, step)
  return WorkdirInfo(workdir=path, spec=spec, step=int(step))


def load_ema_params(workdir, *, step: int | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> TrainedModel:
  """Restores the EMA parameters of checkpoint `step` (default: the latest good one) of
  `workdir`, replicated over `mesh` (default: every device). Only the checkpoint's `ema` item
  is read. Without an explicit step, a checkpoint whose arrays turn out unreadable is skipped
  (one warning line) for the next older one."""
  explicit = step is not None and not isinstance(workdir, WorkdirInfo)
  wd = workdir if isinstance(workdir, WorkdirInfo) else read_workdir(workdir, step)
  mesh = mesh or parallel.make_mesh()
  replicated = NamedSharding(mesh, P())
  abstract = checkpointing.abstract_like(
      jax.eval_shape(wd.spec.init_params, jax.random.PRNGKey(0)), replicated)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(wd.workdir), keep=None,
                                       read_only=True)
  try:
    restored_step, ema_params = checkpointing.restore_latest_good(
        manager, abstract, step=wd.step if explicit else None, at_most=wd.step,
        restore_fn=lambda s: checkpointing.restore_ema(manager, s, abstract))
  finally:
    manager.close()
  return TrainedModel.from_spec(wd.spec, ema_params, mesh, step=restored_step,
                                workdir=wd.workdir)


# ------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one NumPy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def default_batch_size(num_samples: int, num_devices: int,
                       max_batch: int = DEFAULT_MAX_BATCH) -> int:
  """The smallest multiple of the device count ≥ `num_samples`, capped near `max_batch`."""
  cap = max(num_devices, max_batch // num_devices * num_devices)
  return min(-(-num_samples // num_devices) * num_devices, cap)


def default_labels(num_samples: int, num_classes: int | None) -> np.ndarray:
  """Every class in turn (0, 1, …, K−1, 0, …); zeros for an unconditional model."""
  return np.arange(num_samples, dtype=np.int32) % (num_classes or 1)


def make_sampler(trained: TrainedModel, sampler: sampler_config.SamplerConfig):
  """`run(params, rng, labels [B]) -> images [B, H, W, C]` in [-1, 1], data-parallel."""
  fn = sampler_lib.sample_fn(trained.model, trained.diffusion,
                          parameterization=trained.parameterization, sampler=sampler,
                          num_classes=trained.num_classes,
                          process=trained.spec.diffusion.make_process(),
                          consistency_sigma_data=trained.spec.consistency_sigma_data)
  return sampler_lib.data_parallel_sampler(fn, trained.mesh, trained.image_shape)


def generate(trained: TrainedModel, sampler: sampler_config.SamplerConfig, *, num_samples: int,
             rng: jax.Array, batch_size: int | None = None, labels=None,
             progress: bool = False, run=None) -> tuple[np.ndarray, np.ndarray, int]:
  """`num_samples` uint8 images `[N, H, W, C]`, their labels `[N]`, and the model
  evaluations per sample (the most any device needed), in batches.

  Batch i is sampled with `fold_in(rng, i)`; the last batch is padded to the full batch
  size (one compiled shape) and cut. `labels` default to `default_labels`. `run` reuses a
  sampler from `make_sampler` (it must match `sampler`).
  """
  n_dev = trained.mesh.devices.size
  batch_size = batch_size or default_batch_size(num_samples, n_dev)
  if batch_size <= 0 or batch_size % n_dev:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the {n_dev} '
                     'devices')
  labels = (default_labels(num_samples, trained.num_classes) if labels is None
            else np.asarray(labels, np.int32))
  if labels.shape != (num_samples,):
    raise ValueError(f'need {num_samples} labels, got shape {labels.shape}')
  run = run or make_sampler(trained, sampler)
  num_batches = -(-num_samples // batch_size)
  batches = range(num_batches)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm(batches, desc=f'sampling ({batch_size}/batch)', unit='batch')
  out, nfe = [], 0
  for i in batches:
    chunk = labels[i * batch_size:(i + 1) * batch_size]
    padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)])
    images, evaluations = run(trained.ema_params, jax.random.fold_in(rng, i), padded)
    out.append(images_lib.to_uint8(to_host(images))[:len(chunk)])
    nfe = max(nfe, int(np.max(to_host(evaluations))))
  return np.concatenate(out), labels, nfe


def _denoise_fn(trained: TrainedModel, params, labels, sampler: sampler_config.SamplerConfig):
  return sampler_lib.make_denoise_fn(
      trained.model, params, labels if trained.num_classes else None,
      guidance_scale=sampler.guidance_scale, num_classes=trained.num_classes)


def progressive(trained: TrainedModel, sampler: sampler_config.SamplerConfig, rng: jax.Array,
                labels, num_frames: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The trajectory of a few samples (on one device): x_t and the predicted x₀ at levels of
  any fixed-step sampler, recorded by a trajectory callback on the model's evaluations.

  Returns uint8 (x_t `[F, B, H, W, C]`, x̂₀ `[F, B, H, W, C]`) and the model timesteps `[F]`
  of `num_frames` evenly spaced levels of the sampler's schedule, the noisiest first (for
  ddpm: the respaced chain's, T−1 down to 0). At a level evaluated more than once (heun, pc,
  ald) the last evaluation is shown. Same rng: the samples of `make_sampler`'s first device.
  """
  if sampler.info.adaptive:
    raise ValueError(f'--progressive shows the levels of a fixed-step sampler, not '
                     f'{sampler.kind.value!r}')
  process = trained.spec.diffusion.make_process()
  levels = np.asarray(sampler_lib.schedule_of(sampler, process).t)  # [K], noisiest first
  k = len(levels)
  picks = np.unique(np.round(np.linspace(k - 1, 0, num_frames)).astype(int))[::-1]
  picks = k - 1 - picks     # positions in `levels`, noisiest first
  labels = jnp.asarray(labels, jnp.int32)
  shape = (labels.shape[0],) + tuple(trained.image_shape)
  seen = {}

  def record(t, x, x0):
    seen[float(np.asarray(t)[0])] = (np.asarray(x), np.asarray(x0))  # the last one wins

  @jax.jit
  def run(params, rng, labels):
    return sampler_lib.sample(_denoise_fn(trained, params, labels, sampler), process, shape,
                              rng, sampler=sampler, parameterization=trained.parameterization,
                              record=record,
                              consistency_sigma_data=trained.spec.consistency_sigma_data)

  jax.block_until_ready(run(jax.device_get(trained.ema_params), rng, labels))
  jax.effects_barrier()
  x_t = np.stack([seen[float(levels[j])][0] for j in picks])
  x0 = np.stack([seen[float(levels[j])][1] for j in picks])
  with jax.ensure_compile_time_eval():
    timesteps = np.asarray(process.model_timestep(jnp.asarray(levels[picks])))
  return images_lib.to_uint8(x_t), images_lib.to_uint8(x0), timesteps


def slerp(z0: jax.Array, z1: jax.Array, alpha: jax.Array) -> jax.Array:
  """Spherical interpolation of `z0`, `z1` `[...]` at weights `alpha [K]` → `[K, ...]`."""
  a, b = z0.reshape(-1), z1.reshape(-1)
  # HIGHEST: the angle is exact math; a GPU at the default precision would round to TF32.
  cos = jnp.clip(jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
                 / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), -1.0, 1.0)
  theta = jnp.arccos(cos)
  alpha = alpha[:, None]
  small = theta < 1e-4  # nearly parallel: linear interpolation is exact enough
  sin = jnp.where(small, 1.0, jnp.sin(theta))
  w0 = jnp.where(small, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / sin)
  w1 = jnp.where(small, alpha, jnp.sin(alpha * theta) / sin)
  return (w0 * a + w1 * b).reshape((-1,) + z0.shape)


def interpolate(trained: TrainedModel, sampler: sampler_config.SamplerConfig, x_a: np.ndarray,
                x_b: np.ndarray, label: int = 0, num: int = 10) -> np.ndarray:
  """Images between uint8 `x_a` and `x_b` `[H, W, C]` through their deterministic latents:
  encode both (`sampler_lib.encode`, the solve run upwards), slerp the latents, decode with
  the same sampler made deterministic: ddpm goes through DDIM over the same steps (as Song
  et al. do), ddim with η = 0, heun without churn; the SDE samplers are a one-line ValueError.
  Class-conditional models use `label`.

  Returns uint8 `[num, H, W, C]`; the ends reconstruct `x_a` and `x_b` (approximately).
  """
  if sampler.kind is sampler_config.SamplerKind.DDPM:
    sampler = sampler_config.SamplerConfig('ddim', steps=sampler.steps,
                                           clip_denoised=sampler.clip_denoised,
                                           guidance_scale=sampler.guidance_scale,
                                           step_schedule=sampler.step_schedule)
  sampler = dataclasses.replace(sampler, eta=0.0, churn=0.0)
  process = trained.spec.diffusion.make_process()
  param = trained.parameterization
  x = jnp.asarray(np.stack([x_a, x_b]), jnp.float32) / 127.5 - 1.0  # [2, H, W, C]

  @jax.jit
  def run(params, x):
    enc_labels = jnp.full((2,), label, jnp.int32)
    z = sampler_lib.encode(_denoise_fn(trained, params, enc_labels, sampler), process, x,
                           sampler=sampler, parameterization=param)
    zs = slerp(z[0], z[1], jnp.linspace(0.0, 1.0, num))  # [num, H, W, C]
    dec_labels = jnp.full((num,), label, jnp.int32)
    images, _ = sampler_lib.sample(_denoise_fn(trained, params, dec_labels, sampler), process,
                                   zs.shape, jax.random.PRNGKey(0), sampler=sampler,
                                   parameterization=param, x_init=zs,
                                   consistency_sigma_data=trained.spec.consistency_sigma_data)
    return images

  return images_lib.to_uint8(run(jax.device_get(trained.ema_params), x))


# ------------------------------------------------------------------------------------------
# sample.py: validate everything, then sample and write.
# ------------------------------------------------------------------------------------------


def view_scale(image_size: int) -> int:
  """How much to enlarge tiles of `image_size` px for viewing: 8 px → ×4, ≥ 32 px → ×1."""
  return max(1, min(4, 32 // max(image_size, 1)))


def _strip_grid(rows: list[np.ndarray], pad: int = 1) -> np.ndarray:
  """Rows of images `[K, H, W, C]` (equal K) → one uint8 grid, row by row."""
  flat = np.concatenate(rows)
  return images_lib.make_grid(flat, ncol=rows[0].shape[0], pad=pad)


def _steps_name(cfg: sampler_config.SamplerConfig, num_timesteps: int) -> str:
  if cfg.kind is sampler_config.SamplerKind.ODE:
    return f'rtol{cfg.rtol:g}'
  return str(cfg.steps or num_timesteps)


def _validate_output(output: epath.Path, overwrite: bool) -> None:
  if output.exists() and not output.is_dir():
    raise FileExistsError(f'--output {output} exists and is not a directory')
  taken = [n for n in ('samples.npz', 'grid.png', 'progressive.png', 'interpolation.png')
           if (output / n).exists()]
  if taken and not overwrite:
    raise FileExistsError(f'{output} already holds {", ".join(taken)}: pass --overwrite or '
                          'another --output')


def sample_to_dir(workdir, *, num_samples: int, sampler: sampler_config.SamplerConfig,
                  batch_size: int | None = None, seed: int = 0, output=None,
                  label: int | None = None, progressive_chain: bool = False,
                  interpolation: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
  """Samples from the latest checkpoint of `workdir` and writes, into `output`
  (default `WORKDIR/samples_<sampler>_<steps>`; local or remote):

    samples.npz        images uint8 [N, H, W, C]; labels int32 [N] (class-conditional only)
    grid.png           the samples, in a square grid (small images enlarged for viewing)
    progressive.png    (progressive_chain) for 4 samples, rows of x_t and of the predicted x₀
                       at 10 steps of the ancestral chain, t = T−1 … 0, left to right
    interpolation.png  (interpolation) 10 images between samples 0 and 1 through their DDIM
                       latents (η = 0, the same steps)

  Every argument is checked before anything is restored or written; a bad one raises
  ValueError / FileNotFoundError / FileExistsError with a one-line message. Returns the
  paths written, the checkpoint step and timings.
  """
  if not isinstance(num_samples, int) or num_samples <= 0:
    raise ValueError(f'--num_samples must be a positive integer, got {num_samples!r}')
  cfg = sampler
  if interpolation and cfg.kind.value not in ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m',
                                               'dpmpp_3m'):
    raise ValueError('--interpolate encodes through a deterministic solve: use it with --sampler '
                     f'ddpm or ddim (through DDIM), euler, heun, dpmpp_2m or dpmpp_3m, not '
                     f'{cfg.kind.value!r}')
  if progressive_chain and cfg.info.adaptive:
    raise ValueError(f'--progressive shows the levels of a fixed-step sampler, not '
                     f'{cfg.kind.value!r}')
  if interpolation and num_samples < 2:
    raise ValueError('--interpolate needs --num_samples >= 2 (it joins samples 0 and 1)')
  n_dev = jax.device_count()
  if batch_size is not None and (batch_size <= 0 or batch_size % n_dev):
    raise ValueError(f'--batch_size={batch_size} must be a positive multiple of the {n_dev} '
                     f'devices')
  wd = read_workdir(workdir)
  if cfg.steps is not None and not 1 <= cfg.steps <= wd.num_timesteps:
    raise ValueError(f'--steps must be in [1, {wd.num_timesteps}] (the model\'s T), '
                     f'got {cfg.steps}')
  if label is not None:
    if not wd.num_classes:
      raise ValueError('--label needs a class-conditional model; this one is unconditional')
    if not 0 <= label < wd.num_classes:
      raise ValueError(f'--label must be in [0, {wd.num_classes}), got {label}')
  if cfg.guidance_scale and not wd.num_classes:
    raise ValueError('--guidance_scale needs a class-conditional model (labels); this one is '
                     'unconditional')
  output = (paths.as_path(output) if output is not None else
            wd.workdir / f'samples_{cfg.kind.value}_{_steps_name(cfg, wd.num_timesteps)}')
  _validate_output(output, overwrite)

  t0 = time.time()
  trained = load_ema_params(wd)
  labels = (np.full((num_samples,), label, np.int32) if label is not None
            else default_labels(num_samples, trained.num_classes))
  rng = jax.random.PRNGKey(seed)
  sample_rng, chain_rng = jax.random.split(rng)
  t1 = time.time()
  # Every batch has one shape (the last is padded), so the sampler compiles once: the report
  # counts its programs, and a second one would show a recompile.
  with compilation.track('sampler') as report:
    images, labels, nfe = generate(trained, cfg, num_samples=num_samples, rng=sample_rng,
                                   batch_size=batch_size, labels=labels, progress=progress)
  t2 = time.time()
  result: dict[str, Any] = dict(step=trained.step, output=str(output),
                                num_samples=num_samples, sampler=cfg.describe(),
                                model_evaluations=nfe, restore_seconds=t1 - t0,
                                sample_seconds=t2 - t1,
                                compile_seconds=report.total_seconds,
                                compile_programs=report.programs,
                                compile_cache=report.cache)
  if jax.process_index() != 0:
    return result
  output.mkdir(parents=True, exist_ok=True)
  arrays = dict(images=images)
  if trained.num_classes:
    arrays['labels'] = labels
  with (output / 'samples.npz').open('wb') as f:
    np.savez(f, **arrays)
  scale = view_scale(min(images.shape[1:3]))
  save_png(output / 'grid.png', images_lib.make_grid(images), scale)
  result['samples'] = str(output / 'samples.npz')
  result['grid'] = str(output / 'grid.png')
  if progressive_chain:
    k = min(4, num_samples)
    x_t, x0, _ = progressive(trained, cfg, chain_rng, labels[:k])  # [F, k, H, W, C] each
    rows = []
    for i in range(k):
      rows += [x_t[:, i], x0[:, i]]
    result['progressive'] = str(output / 'progressive.png')
    save_png(output / 'progressive.png', _strip_grid(rows), scale)
  if interpolation:
    strip = interpolate(trained, cfg, images[0], images[1], label=int(labels[0]))
    result['interpolation'] = str(output / 'interpolation.png')
    save_png(output / 'interpolation.png', _strip_grid([strip]), scale)
  result['total_seconds'] = time.time() - t0
  return result
