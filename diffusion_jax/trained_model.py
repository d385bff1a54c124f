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
from diffusion_jax.sampling import controllable
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


# The diffusion fields that define the process a classifier must share with the model.
_PROCESS_FIELDS = ('process', 'schedule', 'num_timesteps', 'beta_start', 'beta_end',
                   'zero_terminal_snr', 'sigma_min', 'sigma_max')


def read_classifier(workdir, model: ExperimentSpec) -> WorkdirInfo:
  """The workdir of a noise-conditional classifier for guiding `model`: one-line ValueErrors
  when it is not a classifier, or its image shape, classes or process differ from the
  model's; FileNotFoundError when it is not a trained workdir."""
  info = read_workdir(workdir)
  c = info.spec
  where = f'--classifier {str(info.workdir)!r}'
  if not c.is_classifier:
    raise ValueError(f"{where} is not a classifier (diffusion.objective "
                     f"{c.diffusion.objective.value!r}); train one with "
                     'configs/digits_classifier.py')
  if c.data.image_shape != model.data.image_shape:
    raise ValueError(f'{where} classifies images of shape {c.data.image_shape}, the model '
                     f'draws {model.data.image_shape}')
  classes = model.num_classes or model.data.num_classes
  if c.data.num_classes != classes:
    raise ValueError(f'{where} has {c.data.num_classes} classes, the model\'s data '
                     f'{classes}')
  differ = [f for f in _PROCESS_FIELDS
            if getattr(c.diffusion, f) != getattr(model.diffusion, f)]
  if differ:
    f = differ[0]
    raise ValueError(f'{where} was trained on another process: diffusion.{f} is '
                     f'{getattr(c.diffusion, f)!r}, the model\'s {getattr(model.diffusion, f)!r}')
  return info


def load_classifier(workdir, model: ExperimentSpec, *,
                    mesh: jax.sharding.Mesh | None = None) -> TrainedModel:
  """The EMA parameters of the classifier in `workdir` (a path, or `read_classifier`'s
  answer; checked by `read_classifier`)."""
  info = workdir if isinstance(workdir, WorkdirInfo) else read_classifier(workdir, model)
  return load_ema_params(info, mesh=mesh)


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


def make_sampler(trained: TrainedModel, sampler: sampler_config.SamplerConfig, *,
                 classifier: TrainedModel | None = None, classifier_scale: float = 0.0,
                 control: controllable.Control | None = None):
  """`run(params, rng, labels [B]) -> images [B, H, W, C]` in [-1, 1], data-parallel; with
  a `control`, `run(params, rng, labels, images, masks)` (`data_parallel_control`). With a
  `classifier`, params are (the model's, the classifier's): see `params_of`."""
  fn = sampler_lib.sample_fn(trained.model, trained.diffusion,
                          parameterization=trained.parameterization, sampler=sampler,
                          num_classes=trained.num_classes,
                          process=trained.spec.diffusion.make_process(),
                          consistency_sigma_data=trained.spec.consistency_sigma_data,
                          classifier=None if classifier is None else classifier.model,
                          classifier_scale=classifier_scale, control=control)
  if control is not None:
    return sampler_lib.data_parallel_control(fn, trained.mesh)
  return sampler_lib.data_parallel_sampler(fn, trained.mesh, trained.image_shape)


def params_of(trained: TrainedModel, classifier: TrainedModel | None):
  """What `make_sampler`'s run takes as params."""
  return trained.ema_params if classifier is None else (trained.ema_params,
                                                        classifier.ema_params)


def guided_labels(num_samples: int, trained: TrainedModel,
                  classifier: TrainedModel | None) -> np.ndarray:
  """`default_labels` of the model's classes, or of the classifier's when it guides."""
  classes = trained.num_classes or (classifier.spec.data.num_classes if classifier else None)
  return default_labels(num_samples, classes)


def generate(trained: TrainedModel, sampler: sampler_config.SamplerConfig, *, num_samples: int,
             rng: jax.Array, batch_size: int | None = None, labels=None,
             progress: bool = False, run=None, classifier: TrainedModel | None = None,
             classifier_scale: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:
  """`num_samples` uint8 images `[N, H, W, C]`, their labels `[N]`, and the model
  evaluations per sample (the most any device needed), in batches.

  Batch i is sampled with `fold_in(rng, i)`; the last batch is padded to the full batch
  size (one compiled shape) and cut. `labels` default to `default_labels` (of the
  classifier's classes when one guides). `run` reuses a sampler from `make_sampler` (it must
  match `sampler`, `classifier` and `classifier_scale`).
  """
  n_dev = trained.mesh.devices.size
  batch_size = batch_size or default_batch_size(num_samples, n_dev)
  if batch_size <= 0 or batch_size % n_dev:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the {n_dev} '
                     'devices')
  labels = (guided_labels(num_samples, trained, classifier) if labels is None
            else np.asarray(labels, np.int32))
  if labels.shape != (num_samples,):
    raise ValueError(f'need {num_samples} labels, got shape {labels.shape}')
  run = run or make_sampler(trained, sampler, classifier=classifier,
                            classifier_scale=classifier_scale)
  params = params_of(trained, classifier)
  num_batches = -(-num_samples // batch_size)
  batches = range(num_batches)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm(batches, desc=f'sampling ({batch_size}/batch)', unit='batch')
  out, nfe = [], 0
  for i in batches:
    chunk = labels[i * batch_size:(i + 1) * batch_size]
    padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)])
    images, evaluations = run(params, jax.random.fold_in(rng, i), padded)
    out.append(images_lib.to_uint8(to_host(images))[:len(chunk)])
    nfe = max(nfe, int(np.max(to_host(evaluations))))
  return np.concatenate(out), labels, nfe


def edit(trained: TrainedModel, sampler: sampler_config.SamplerConfig,
         control: controllable.Control, images: np.ndarray, masks: np.ndarray | None = None, *,
         rng: jax.Array, batch_size: int | None = None, labels=None, run=None,
         classifier: TrainedModel | None = None, classifier_scale: float = 0.0
         ) -> tuple[np.ndarray, int]:
  """Inpaints or edits uint8 `images` `[N, H, W, C]` as `control` says (`masks` float
  `[N, H, W, C]`, 1 on the known pixels, for inpainting): uint8 results `[N, H, W, C]` and
  the model evaluations per image. Batches as `generate`'s; `labels` as there."""
  n = images.shape[0]
  n_dev = trained.mesh.devices.size
  batch_size = batch_size or default_batch_size(n, n_dev)
  if batch_size <= 0 or batch_size % n_dev:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the {n_dev} '
                     'devices')
  labels = guided_labels(n, trained, classifier) if labels is None else np.asarray(labels,
                                                                                   np.int32)
  x = np.asarray(images, np.float32) / 127.5 - 1.0
  masks = np.ones_like(x) if masks is None else np.broadcast_to(masks, x.shape)
  run = run or make_sampler(trained, sampler, classifier=classifier,
                            classifier_scale=classifier_scale, control=control)
  params = params_of(trained, classifier)
  out, nfe = [], 0
  for i in range(-(-n // batch_size)):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    pad = batch_size - len(labels[sl])
    padded = [np.concatenate([a[sl], np.zeros((pad,) + a.shape[1:], a.dtype)])
              for a in (labels, x, masks)]
    if pad:   # a padded mask of zeros would be all unknown: harmless, but cut
      padded[2][-pad:] = 1.0
    result, evaluations = run(params, jax.random.fold_in(rng, i), *padded)
    out.append(images_lib.to_uint8(to_host(result))[:batch_size - pad])
    nfe = max(nfe, int(np.max(to_host(evaluations))))
  return np.concatenate(out), nfe


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


def _control_of(inpaint, images, mask, init, strength, jump_length, jump_n_sample
                ) -> controllable.Control | None:
  """The task sample.py's flags name (None: sampling); one-line errors for a bad mix."""
  inpaint_flags = images is not None or mask is not None or jump_length is not None \
      or jump_n_sample is not None
  if inpaint_flags and not inpaint:
    raise ValueError('--images, --mask, --jump_length and --jump_n_sample go with --inpaint')
  if inpaint and (init is not None or strength is not None):
    raise ValueError('--inpaint and --init/--strength are two tasks: give one')
  if inpaint:
    if images is None or mask is None:
      raise ValueError('--inpaint needs --images FILE and --mask REGION|FILE')
    return controllable.Control('inpaint', jump_length=jump_length or 1,
                                jump_n_sample=jump_n_sample or 1)
  if init is None and strength is None:
    return None
  if init is None or strength is None:
    raise ValueError('--init FILE and --strength s go together (image-to-image)')
  return controllable.Control('image_to_image', strength=strength)


def _validate_output(output: epath.Path, overwrite: bool) -> None:
  if output.exists() and not output.is_dir():
    raise FileExistsError(f'--output {output} exists and is not a directory')
  taken = [n for n in ('samples.npz', 'grid.png', 'progressive.png', 'interpolation.png')
           if (output / n).exists()]
  if taken and not overwrite:
    raise FileExistsError(f'{output} already holds {", ".join(taken)}: pass --overwrite or '
                          'another --output')


def read_images(path, image_shape: tuple[int, int, int], what: str = '--images') -> np.ndarray:
  """uint8 images `[N, H, W, C]` of the model's shape from an .npz (its `images` array, as
  sample.py writes) or a PNG grid (tiles of H×W with 1 px of padding, at any whole view scale,
  as sample.py's grid.png; blank trailing tiles dropped). One-line errors otherwise."""
  path = paths.as_path(path)
  if not path.exists():
    raise FileNotFoundError(f'{what} {str(path)!r} not found')
  h, w, c = image_shape
  if path.suffix == '.npz':
    with path.open('rb') as f, np.load(f) as z:
      if 'images' not in z:
        raise ValueError(f'{what} {str(path)!r} has no `images` array (it has '
                         f'{", ".join(z.files) or "none"})')
      images = z['images']
  elif path.suffix == '.png':
    images = _png_tiles(path, image_shape, what)
  else:
    raise ValueError(f'{what} {str(path)!r}: expected an .npz or a .png file')
  if images.dtype != np.uint8:
    raise ValueError(f'{what} {str(path)!r} holds {images.dtype} images; expected uint8 in '
                     '[0, 255]')
  if images.ndim == 3 and c == 1:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (h, w, c) or not images.shape[0]:
    raise ValueError(f'{what} {str(path)!r} holds images of shape {images.shape}; the model '
                     f'needs [N, {h}, {w}, {c}] with N >= 1')
  return images


def _png_tiles(path: epath.Path, image_shape: tuple[int, int, int], what: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image_shape
  with path.open('rb') as f:
    grid = np.asarray(Image.open(f).convert('L' if c == 1 else 'RGB'))
  grid = grid[..., None] if grid.ndim == 2 else grid
  gh, gw = grid.shape[:2]
  for scale in range(1, 17):   # a grid of R×K tiles: (R(h+1)+1)·scale rows
    if gh % scale or gw % scale:
      continue
    rows, cols = (gh // scale - 1) / (h + 1), (gw // scale - 1) / (w + 1)
    if rows == int(rows) and cols == int(cols) and rows >= 1 and cols >= 1:
      small = grid[::scale, ::scale]
      tiles = [small[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w]
               for r in range(int(rows)) for k in range(int(cols))]
      while len(tiles) > 1 and np.all(tiles[-1] == 255):
        tiles.pop()
      return np.stack(tiles).astype(np.uint8)
  raise ValueError(f'{what} {str(path)!r} is a {gh}×{gw} PNG, not a grid of {h}×{w} tiles '
                   '(1 px padding, as sample.py writes grid.png)')


def read_mask(mask: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """`--mask`: a named region (`controllable.Region`: the unknown part) or an .npz/.png file
  of the mask (`mask` array, or a grayscale image: 255 known, 0 unknown); float32 `[H, W, C]`
  or `[N, H, W, C]`, 1 known. One-line errors for a bad name or file."""
  names = [r.value for r in controllable.Region]
  if mask in names:
    return controllable.region_mask(mask, image_shape)
  path = paths.as_path(mask)
  if not path.exists():
    raise ValueError(f'--mask {mask!r} is neither a region ({", ".join(names)}) nor a file')
  if path.suffix == '.npz':
    with path.open('rb') as f, np.load(f) as z:
      if 'mask' not in z:
        raise ValueError(f'--mask {mask!r} has no `mask` array')
      m = z['mask']
  elif path.suffix == '.png':
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with path.open('rb') as f:
      m = np.asarray(Image.open(f).convert('L')) / 255.0
  else:
    raise ValueError(f'--mask {mask!r}: expected a region name, an .npz or a .png file')
  return controllable.check_mask(m, image_shape)


def _edit_strips(inputs: np.ndarray, masks: np.ndarray | None, results: np.ndarray,
                 limit: int = 64) -> np.ndarray:
  """A grid with one row per image (the first `limit`): the input, the input with its
  unknown pixels grey (inpainting), and the result."""
  n = min(limit, inputs.shape[0])
  columns = [inputs[:n]]
  if masks is not None:
    m = np.broadcast_to(masks, inputs.shape)[:n]
    columns.append(np.where(m > 0.5, inputs[:n], 128).astype(np.uint8))
  columns.append(results[:n])
  tiles = np.stack(columns, axis=1).reshape((-1,) + inputs.shape[1:])
  return images_lib.make_grid(tiles, ncol=len(columns))


def sample_to_dir(workdir, *, num_samples: int, sampler: sampler_config.SamplerConfig,
                  batch_size: int | None = None, seed: int = 0, output=None,
                  label: int | None = None, progressive_chain: bool = False,
                  interpolation: bool = False, overwrite: bool = False,
                  progress: bool = True, classifier=None, classifier_scale: float | None = None,
                  inpaint: bool = False, images=None, mask: str | None = None, init=None,
                  strength: float | None = None, jump_length: int | None = None,
                  jump_n_sample: int | None = None) -> dict[str, Any]:
  """Samples from the latest checkpoint of `workdir` and writes, into `output`
  (default `WORKDIR/samples_<sampler>_<steps>`; local or remote):

    samples.npz        images uint8 [N, H, W, C]; labels int32 [N] (class-conditional only)
    grid.png           the samples, in a square grid (small images enlarged for viewing)
    progressive.png    (progressive_chain) for 4 samples, rows of x_t and of the predicted x₀
                       at 10 steps of the ancestral chain, t = T−1 … 0, left to right
    interpolation.png  (interpolation) 10 images between samples 0 and 1 through their DDIM
                       latents (η = 0, the same steps)

  Controllable generation (docs/controllable.md):
    classifier         a classifier workdir (objective 'classifier') whose
                       `classifier_scale` (default 1)·∇ log p(y | x_t) guides every step;
                       the labels are `label` or every class in turn
    inpaint            fill the unknown pixels of `images` (an .npz or a PNG grid) under `mask`
                       (a region name or a file); RePaint with `jump_length`/`jump_n_sample`
    init, strength     image-to-image (SDEdit) of the images in `init`
  These write samples.npz (`images`, the results; `inputs`; `masks`) and grid.png with one row
  per image: the input, the known pixels (inpainting) and the result. `num_samples` is then
  the number of images in the file.

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
  control = _control_of(inpaint, images, mask, init, strength, jump_length, jump_n_sample)
  if control is not None:
    control.check(cfg)
    if progressive_chain or interpolation:
      raise ValueError('--progressive and --interpolate draw from the prior, not with '
                       '--inpaint or --init')
  if classifier_scale is not None and classifier is None:
    raise ValueError('--classifier_scale needs --classifier WORKDIR')
  n_dev = jax.device_count()
  if batch_size is not None and (batch_size <= 0 or batch_size % n_dev):
    raise ValueError(f'--batch_size={batch_size} must be a positive multiple of the {n_dev} '
                     f'devices')
  wd = read_workdir(workdir)
  cls_info = None
  if classifier is not None:
    cls_info = read_classifier(classifier, wd.spec)
    classifier_scale = 1.0 if classifier_scale is None else float(classifier_scale)
    if not (np.isfinite(classifier_scale) and classifier_scale >= 0):
      raise ValueError(f'--classifier_scale must be a finite number >= 0, got '
                       f'{classifier_scale!r}')
  if cfg.steps is not None and not 1 <= cfg.steps <= wd.num_timesteps:
    raise ValueError(f'--steps must be in [1, {wd.num_timesteps}] (the model\'s T), '
                     f'got {cfg.steps}')
  wd.spec.check_sampler(cfg)   # a classifier workdir, or a sampler of another process
  classes = wd.num_classes or (cls_info.spec.data.num_classes if cls_info else None)
  if label is not None:
    if not classes:
      raise ValueError('--label needs a class-conditional model or --classifier; this model '
                       'is unconditional')
    if not 0 <= label < classes:
      raise ValueError(f'--label must be in [0, {classes}), got {label}')
  if cfg.guidance_scale and not wd.num_classes:
    raise ValueError('--guidance_scale needs a class-conditional model (labels); this one is '
                     'unconditional')
  inputs = masks = None
  if control is not None:
    shape = wd.spec.data.image_shape
    inputs = read_images(images if control.inpainting else init, shape,
                         '--images' if control.inpainting else '--init')
    num_samples = inputs.shape[0]
    if control.inpainting:
      masks = read_mask(mask, shape)
      if masks.ndim == 4 and masks.shape[0] != num_samples:
        raise ValueError(f'--mask holds {masks.shape[0]} masks for {num_samples} images')
  task = 'samples' if control is None else control.task.value
  suffix = '' if cls_info is None else f'_classifier{classifier_scale:g}'
  output = (paths.as_path(output) if output is not None else
            wd.workdir / f'{task}_{cfg.kind.value}_{_steps_name(cfg, wd.num_timesteps)}{suffix}')
  _validate_output(output, overwrite)

  t0 = time.time()
  trained = load_ema_params(wd)
  guide = None if cls_info is None else load_classifier(cls_info, wd.spec, mesh=trained.mesh)
  labels = (np.full((num_samples,), label, np.int32) if label is not None
            else guided_labels(num_samples, trained, guide))
  rng = jax.random.PRNGKey(seed)
  sample_rng, chain_rng = jax.random.split(rng)
  t1 = time.time()
  # Every batch has one shape (the last is padded), so the sampler compiles once: the report
  # counts its programs, and a second one would show a recompile.
  with compilation.track('sampler') as report:
    if control is None:
      images, labels, nfe = generate(trained, cfg, num_samples=num_samples, rng=sample_rng,
                                     batch_size=batch_size, labels=labels, progress=progress,
                                     classifier=guide, classifier_scale=classifier_scale or 0.0)
    else:
      images, nfe = edit(trained, cfg, control, inputs, masks, rng=sample_rng,
                         batch_size=batch_size, labels=labels, classifier=guide,
                         classifier_scale=classifier_scale or 0.0)
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
  if trained.num_classes or guide is not None:
    arrays['labels'] = labels
  if inputs is not None:
    arrays['inputs'] = inputs
  if masks is not None:
    arrays['masks'] = np.broadcast_to(masks, inputs.shape).astype(np.uint8)
  with (output / 'samples.npz').open('wb') as f:
    np.savez(f, **arrays)
  scale = view_scale(min(images.shape[1:3]))
  grid = (images_lib.make_grid(images) if control is None
          else _edit_strips(inputs, masks, images))
  save_png(output / 'grid.png', grid, scale)
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
