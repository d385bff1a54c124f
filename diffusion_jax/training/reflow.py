"""Rectified flow's reflow (Liu et al. 2023, "Flow Straight and Fast"): the teacher flow's
PF-ODE joins noise ε to a sample x₀; a new flow trained on the straight lines between those
pairs (`flow_matching.loss` with the pair's ε) has straighter paths, which few Euler steps
follow well.

The pairs are made once, in chunks of `CHUNK`, into `WORKDIR/reflow_pairs/` (`NNNNN.npz`, each
written to a temporary name and renamed, so a chunk is whole or absent): a run that stops
while making them keeps the chunks written and makes only the missing ones when it resumes,
and a resumed run finds them all and never needs the teacher again. Chunk i's ε is drawn from
`fold_in(key(seed), i)` (of the stream `PAIR_STREAM`), so a chunk made again is the same.
`manifest.json` there records what they were made from (teacher and its step, sampler,
steps, seed): pairs made under other settings are refused in one line, never mixed or
deleted. Every process makes the same pairs on its first device; process 0 writes them. (On
several hosts each must see the same chunks: a workdir every host reads alike, as checkpoints
already need.)
"""

from __future__ import annotations

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from diffusion_jax import trained_model
from diffusion_jax.data import input_pipeline
from diffusion_jax.runtime import faults
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.spec import ExperimentSpec

PAIRS_DIR = 'reflow_pairs'
MANIFEST = 'manifest.json'
CHUNK = 500
PAIR_STREAM = 0x5EF1   # folded into key(seed): the pairs' own random stream


def chunk_path(workdir: epath.Path, i: int) -> epath.Path:
  return workdir / PAIRS_DIR / f'{i:05d}.npz'


def num_chunks(num_pairs: int) -> int:
  return math.ceil(num_pairs / CHUNK)


def chunk_noise(seed: int, i: int, shape) -> jax.Array:
  """ε `[CHUNK, *shape]` of chunk i: the prior draw N(0, I) at the process's t_max."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), PAIR_STREAM), i)
  return jax.random.normal(key, (CHUNK,) + tuple(shape), jnp.float32)


def _read_chunk(path: epath.Path, shape) -> tuple[np.ndarray, np.ndarray] | None:
  """(x0, noise) of a chunk file, or None when it is absent or not a whole chunk."""
  if not path.exists():
    return None
  try:
    with np.load(io.BytesIO(path.read_bytes())) as f:
      x0, noise = f['x0'], f['noise']
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('reflow pairs %s unreadable (%s: %s): made again', path, type(e).__name__, e)
    return None
  want = (CHUNK,) + tuple(shape)
  if x0.shape != want or noise.shape != want:
    logging.warning('reflow pairs %s hold %s, not %s: made again', path, x0.shape, want)
    return None
  return x0, noise


def _write_chunk(path: epath.Path, x0: np.ndarray, noise: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, x0=x0, noise=noise)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(buf.getvalue())
  tmp.rename(path)


def manifest_of(spec: ExperimentSpec) -> dict:
  """What the pairs in a workdir were made from: a chunk made under any other is not one of
  this run's."""
  d = spec.distill
  return dict(teacher=d.teacher, teacher_step=d.teacher_step, pair_sampler=d.pair_sampler,
              pair_steps=d.pair_steps, seed=spec.seed, chunk=CHUNK,
              image_shape=list(spec.data.image_shape))


def check_manifest(spec: ExperimentSpec, workdir: epath.Path, is_chief: bool) -> None:
  """Writes `reflow_pairs/manifest.json` on a first start (process 0); a one-line ValueError
  when one is there from other settings (a run stopped before its spec.json was written, then
  started with another config): the chunks there are never mixed with new ones, nor deleted."""
  path = workdir / PAIRS_DIR / MANIFEST
  want = manifest_of(spec)
  if path.exists():
    have = json.loads(path.read_text())
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
      k = diff[0]
      raise ValueError(f'{path} holds pairs made with {k}={have.get(k)!r}, not {want[k]!r}: '
                       f'resume with those settings, or move {path.parent} away')
  elif is_chief:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (MANIFEST + '.tmp')
    tmp.write_text(json.dumps(want, indent=1))
    tmp.rename(path)


def pair_maker(spec: ExperimentSpec):
  """`make(noise [n, H, W, C]) -> x0` with the teacher's EMA weights at `distill.teacher_step`:
  its PF-ODE from each ε by the spec's pair sampler (jitted on this process's first device)."""
  d = spec.distill
  teacher = trained_model.load_ema_params(d.teacher, step=d.teacher_step)
  tspec = teacher.spec
  model, process = tspec.model.make(), tspec.diffusion.make_process()
  sampler = d.pair_sampler_config()
  # This process's own copy, on one device: the weights come replicated over the global mesh
  # (on several hosts partly on devices this process cannot address), where a jit would also
  # solve the same ODE on every device.
  params = jax.tree.map(lambda a: a.addressable_data(0), teacher.ema_params)

  @jax.jit
  def solve(params, noise):
    denoise_fn = sampler_lib.make_denoise_fn(model, params)
    x0, _ = sampler_lib.sample(denoise_fn, process, noise.shape, jax.random.key(0),
                               sampler=sampler, parameterization=tspec.parameterization,
                               x_init=noise)
    return x0
  return lambda noise: solve(params, noise)


def ensure_pairs(spec: ExperimentSpec, workdir: epath.Path, is_chief: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(x0, noise), float32 `[num_pairs, H, W, C]` each: the chunks in the workdir, the missing
  ones made first (with the teacher: `pair_maker`) and written by process 0."""
  d = spec.distill
  shape = spec.data.image_shape
  check_manifest(spec, workdir, is_chief)
  chunks = [_read_chunk(chunk_path(workdir, i), shape) for i in range(num_chunks(d.num_pairs))]
  missing = [i for i, c in enumerate(chunks) if c is None]
  if missing:
    logging.info('reflow: making %d of %d chunks of %d teacher pairs (%s, %d steps)',
                 len(missing), len(chunks), CHUNK, d.pair_sampler, d.pair_steps)
    make = pair_maker(spec)
    for i in missing:
      noise = chunk_noise(spec.seed, i, shape)
      x0 = np.asarray(make(noise), np.float32)
      chunks[i] = (x0, np.asarray(noise))
      if is_chief:
        _write_chunk(chunk_path(workdir, i), *chunks[i])
        faults.at(faults.Point.PAIRS_WRITTEN, i)
      logging.info('reflow: chunk %d/%d made', i + 1, len(chunks))
  x0 = np.concatenate([c[0] for c in chunks])[:d.num_pairs]
  noise = np.concatenate([c[1] for c in chunks])[:d.num_pairs]
  return x0, noise


class PairIterator(input_pipeline.InMemoryTrainIterator):
  """The memory pipeline's shuffled, checkpointable stream over the pairs: batches of `image`
  (the teacher's x₀), `noise` (its ε) and `label` (0: reflow's teachers are unconditional)."""

  def __init__(self, x0: np.ndarray, noise: np.ndarray, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    n = len(x0)
    super().__init__(np.zeros((n, 1, 1, 1), np.uint8), np.zeros((n,), np.int32),
                     global_batch_size=global_batch_size, seed=seed, random_flip=False,
                     process_index=process_index, process_count=process_count)
    self._x0, self._noise = x0, noise

  def __next__(self):
    index, _ = self._take()
    return {'image': self._x0[index], 'noise': self._noise[index],
            'label': np.zeros(len(index), np.int32)}
