"""Input pipeline: TFDS random-access sources read with grain, without TensorFlow.

A dataset is a TFDS dataset prepared in `data_dir` as array_record (for example
with `tfds build --file_format=array_record cifar10 --data_dir=DIR`). It is read
with `tfds.data_source(..., download=False)` and grain's `MapDataset`, so the
default path never imports TensorFlow. `digits` (scikit-learn's 8x8 digits, see
`digits.py`) is prepared automatically on first use; nothing is downloaded.

Training stream, identical on every process up to the last step:

    source -> seed(seed) -> shuffle -> repeat forever -> [random flip] -> scale
           -> blocks of B = G / process_count -> every process_count-th block from
              process_index

* Shuffling is a global permutation per epoch; grain folds the epoch number into
  the shuffle seed, so each epoch has its own order.
* The flip's random numbers depend on `seed` and the element's position in the
  global stream, so they also change from epoch to epoch and do not depend on
  how many processes read.
* Sharding happens after shuffling: process p keeps the contiguous slice
  [p·B, (p+1)·B) of every global batch of G = P·B positions. The P local batches of
  step j, concatenated in process order, are therefore the global batch of step j in
  the same order whatever the number of processes, and so is the global array that
  `jax.make_array_from_process_local_data` assembles from them.

Checkpointing: `create_train_iterator` returns a `grain.DatasetIterator`. Its
`get_state()` is a small JSON-able dict (`{'next_index': n}`, counted in local
batches) and `set_state(state)` moves a fresh iterator, built with the same
arguments, to that position: the batches that follow are bit-identical to those
of an iterator that was never interrupted. With orbax, grain registers a handler:

    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    # train_iter is moved in place; restored['data'] is the same object.

grain's handler names each process's file after `jax.process_index()` and
`jax.process_count()`, so pass those as `process_index` / `process_count`.
A state says where, not what: restoring it into an iterator built with other
arguments (seed, batch size, dataset) silently yields another stream.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import datasets
from diffusion_jax.options import Option

Batch = dict[str, np.ndarray]

# Batches read ahead by one background thread. Elements come back in order, so
# the stream does not depend on it; 0 reads in the calling thread.
DEFAULT_PREFETCH_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class ImageDatasetInfo:
  """What a trainer needs to know about a prepared image dataset."""

  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int  # 0 when the dataset has no 'label' feature.
  num_examples: Mapping[str, int]  # split name -> number of examples.


# ------------------------------------------------------------------- sources --


def _builder(dataset: str, data_dir: str | os.PathLike[str] | None):
  """Returns the TFDS builder of a prepared dataset, or raises a one-line error."""
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f'dataset must be a non-empty TFDS name, got {dataset!r}.')
  data_dir = None if data_dir is None else os.fspath(data_dir)
  where = data_dir if data_dir is not None else 'the default TFDS data_dir'
  description = datasets.describe(dataset)
  if description.prepared_locally:
    description.prepare(data_dir)
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(
        f'Unknown dataset {dataset!r}: TFDS has no builder of that name and'
        f' {where} holds no prepared copy of it.'
    ) from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Dataset {dataset!r} is not prepared in {where}; prepare it with'
        f' `tfds build --file_format=array_record {dataset}'
        f' --data_dir={data_dir or "DIR"}`.'
    )
  return builder


def _check_image_feature(dataset: str, features) -> None:
  if 'image' not in features:
    raise ValueError(
        f'Dataset {dataset!r} has no "image" feature (it has {sorted(features)}).'
    )
  image = features['image']
  if len(image.shape) != 3 or None in image.shape or np.dtype(image.np_dtype) != np.uint8:
    raise ValueError(
        f'Dataset {dataset!r}: "image" must be uint8 [H, W, C] with a fixed'
        f' shape, got {image.np_dtype} {image.shape}.'
    )


def _info_from_builder(dataset: str, builder) -> ImageDatasetInfo:
  features = builder.info.features
  _check_image_feature(dataset, features)
  num_classes = features['label'].num_classes if 'label' in features else 0
  return ImageDatasetInfo(
      name=dataset,
      image_shape=tuple(int(d) for d in features['image'].shape),
      num_classes=int(num_classes),
      num_examples={name: int(s.num_examples) for name, s in builder.info.splits.items()},
  )


def dataset_info(
    dataset: str, data_dir: str | os.PathLike[str] | None
) -> ImageDatasetInfo:
  """Image shape, number of classes and split sizes of a prepared dataset."""
  return _info_from_builder(dataset, _builder(dataset, data_dir))


class _InMemorySource(Sequence[dict[str, Any]]):
  """Random access over a split held in memory as {feature: array [N, ...]}."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)
    self._len = len(next(iter(self._arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {k: v[index] for k, v in self._arrays.items()}


def _load_tfrecord_split(dataset: str, data_dir: str | None, split: str):
  """Loads a TFRecord-only split into memory through tf.data (needs TensorFlow)."""
  if importlib.util.find_spec('tensorflow') is None:
    raise ImportError(
        f'Dataset {dataset!r} in {data_dir} is stored as TFRecord, which needs'
        " TensorFlow: `pip install 'diffusion-jax[tf]'`, or prepare it again"
        f' with `tfds build --file_format=array_record {dataset}`.'
    )
  # The whole split is decoded into host memory once: fine for CIFAR-10-sized
  # data; larger datasets should be prepared as array_record instead.
  arrays = tfds.as_numpy(
      tfds.load(dataset, split=split, data_dir=data_dir, download=False, batch_size=-1)
  )
  return _InMemorySource({k: arrays[k] for k in ('image', 'label') if k in arrays})


def _open_split(
    dataset: str, data_dir: str | os.PathLike[str] | None, split: str
) -> tuple[Sequence[Mapping[str, Any]], ImageDatasetInfo]:
  """Random-access source over one split ({'image': uint8 [H, W, C], ...}) and its info."""
  builder = _builder(dataset, data_dir)
  info = _info_from_builder(dataset, builder)
  try:
    builder.info.splits[split]
  except (KeyError, ValueError):
    raise ValueError(
        f'Dataset {dataset!r} has no split {split!r}; it has'
        f' {sorted(builder.info.splits)}.'
    ) from None
  data_dir = None if data_dir is None else os.fspath(data_dir)
  if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    return _load_tfrecord_split(dataset, data_dir, split), info
  source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  return source, info


# -------------------------------------------------------------- transforms --


def _to_model_input(example: Mapping[str, Any]) -> Batch:
  """uint8 image [H, W, C] -> float32 in [-1, 1]; label -> int32 (0 if absent)."""
  image = np.asarray(example['image'], dtype=np.float32) / 127.5 - 1.0  # [H, W, C]
  label = np.int32(example.get('label', 0))
  return {'image': image, 'label': label}


def _random_flip(example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  """Mirrors the image left-right ([H, W, C], axis 1) with probability 1/2."""
  if rng.integers(2):
    example = {**example, 'image': np.asarray(example['image'])[:, ::-1, :]}
  return example


def _eval_example(source, num_real: int, image_shape, index: int) -> Batch:
  """Example `index` of the padded eval split; indices >= num_real are padding."""
  if index < num_real:
    return {**_to_model_input(source[index]), 'mask': np.bool_(True)}
  return {
      'image': np.zeros(image_shape, np.float32),
      'label': np.int32(0),
      'mask': np.bool_(False),
  }


# ----------------------------------------------------------------- batching --


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Validates the sharding arguments and returns global_batch_size // process_count."""
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be a positive int, got {global_batch_size!r}.')
  if not isinstance(process_count, (int, np.integer)) or process_count <= 0:
    raise ValueError(f'process_count must be a positive int, got {process_count!r}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index must be in [0, {process_count}), got {process_index!r}.'
    )
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by'
        f' process_count={process_count}.'
    )
  return int(global_batch_size // process_count)


def _read_options(prefetch_batches: int) -> grain.ReadOptions:
  if prefetch_batches < 0:
    raise ValueError(f'prefetch_batches must be >= 0, got {prefetch_batches!r}.')
  return grain.ReadOptions(
      num_threads=1 if prefetch_batches else 0, prefetch_buffer_size=prefetch_batches
  )


def create_train_iterator(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int = 0,
    process_count: int = 1,
    split: str = 'train',
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> grain.DatasetIterator:
  """Endless, shuffled, checkpointable stream of this process's training batches.

  Args:
    dataset: TFDS name; prepared as array_record in `data_dir` (TFRecord works
      only when TensorFlow is installed). `digits` is prepared on first use.
    data_dir: the TFDS data directory; None for TFDS's default.
    global_batch_size: examples per step over all processes.
    seed: non-negative int; fixes the order of every epoch and the flips.
    random_flip: mirror each image left-right with probability 1/2.
    process_index, process_count: this process's share of each global batch
      (`jax.process_index()`, `jax.process_count()` in a multi-host run).
    split: TFDS split, slicing allowed (e.g. 'train[:90%]').
    prefetch_batches: batches read ahead by one thread; 0 reads in the caller.

  Returns:
    A `grain.DatasetIterator` of {'image': float32 [B, H, W, C] in [-1, 1],
    'label': int32 [B]}, B = global_batch_size // process_count; checkpoint it
    with `get_state()` / `set_state()` or grain's orbax handler (module
    docstring).
  """
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
  read_options = _read_options(prefetch_batches)
  source, _ = _open_split(dataset, data_dir, split)

  ds = grain.MapDataset.source(source).seed(int(seed))
  ds = ds.shuffle().repeat()  # A new permutation each epoch.
  if random_flip:
    ds = ds.random_map(_random_flip)  # Keyed by position in the global stream.
  ds = ds.map(_to_model_input)
  # Cut the global stream into local-sized blocks; process p takes blocks p, p + P, ...:
  # its batch j is positions [j·G + p·B, j·G + (p+1)·B) of the global stream.
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds[process_index::process_count]
  return iter(ds.to_iter_dataset(read_options))


def create_eval_iterator(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = 'test',
    prefetch_batches: int = DEFAULT_PREFETCH_BATCHES,
) -> Iterator[Batch]:
  """One pass over a split, in order, unflipped, padded to whole global batches.

  The split is padded with zero images to ceil(N / global_batch_size) global
  batches, and every process yields that many local batches (so collective ops
  line up). `mask` is False on padding: summing a per-example metric under the
  mask over all batches and processes counts each example exactly once.

  Returns:
    An iterator of {'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B],
    'mask': bool [B]}, B = global_batch_size // process_count.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  read_options = _read_options(prefetch_batches)
  source, info = _open_split(dataset, data_dir, split)

  num_real = len(source)
  num_batches = -(-num_real // global_batch_size)  # ceil
  ds = grain.MapDataset.range(num_batches * global_batch_size)
  ds = ds.map(functools.partial(_eval_example, source, num_real, info.image_shape))
  # Cut the global stream into local-sized blocks; process p takes blocks p, p + P, ...:
  # its batch j is positions [j·G + p·B, j·G + (p+1)·B) of the global stream.
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds[process_index::process_count]
  return iter(ds.to_iter_dataset(read_options))


# ------------------------------------------------------------- in memory --


class DataPipeline(Option):
  """How the training stream is read: `grain` (element by element from the prepared files,
  any size) or `memory` (the split loaded into host memory once, batches cut with NumPy: for
  datasets that fit, far less host time per batch; bench/startup.py measures it)."""

  GRAIN = 'grain'
  MEMORY = 'memory'

  @classmethod
  def _what(cls) -> str:
    return 'data.pipeline'


class InMemoryTrainIterator:
  """Endless, shuffled, checkpointable stream of this process's training batches, cut with
  NumPy from a split held in host memory.

  Epoch e is the permutation `default_rng([seed, e]).permutation(N)`; with flips, the
  element at position i of epoch e is mirrored when the same generator's next draw
  `integers(2, size=N)[i]` is 1. Sharding is `create_train_iterator`'s: process p's batch j is
  positions [j·G + p·B, j·G + (p+1)·B) of the global stream, so the global batch of step j
  does not depend on the number of processes. (The order is not grain's: a run keeps the
  pipeline it started with unless `data.pipeline` is changed on resume.)

  Checkpointing: `get_state()` is the JSON bytes `{"next_index": j}` (the next local batch,
  as grain counts it) and `set_state` moves the stream there, so grain's orbax handler
  (`grain.checkpoint.CheckpointSave/Restore`) saves and restores it unchanged.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
               seed: int, random_flip: bool, process_index: int = 0, process_count: int = 1):
    self._local = _local_batch_size(global_batch_size, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    self._images = np.ascontiguousarray(images)        # uint8 [N, H, W, C]
    self._labels = np.asarray(labels, np.int32)        # [N]
    if self._images.dtype != np.uint8 or self._images.ndim != 4:
      raise ValueError(f'images must be uint8 [N, H, W, C], got {self._images.dtype} '
                       f'{self._images.shape}.')
    if len(self._images) == 0 or self._labels.shape != (len(self._images),):
      raise ValueError(f'need one label per image, got {self._labels.shape} for '
                       f'{len(self._images)} images.')
    self._global = int(global_batch_size)
    self._offset = int(process_index) * self._local
    self._seed, self._flip = int(seed), bool(random_flip)
    self._next = 0
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

  def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(permutation [N], flips [N] or None) of epoch e; the last few are kept."""
    if e not in self._epochs:
      rng = np.random.default_rng([self._seed, e])
      n = len(self._images)
      perm = rng.permutation(n)
      flips = rng.integers(2, size=n).astype(bool) if self._flip else None
      if len(self._epochs) >= 4:
        self._epochs.pop(min(self._epochs))
      self._epochs[e] = (perm, flips)
    return self._epochs[e]

  def __iter__(self) -> 'InMemoryTrainIterator':
    return self

  def __next__(self) -> Batch:
    index, flip = self._take()
    images = self._images[index]                                    # uint8 [B, H, W, C]
    if flip.any():
      images[flip] = images[flip, :, ::-1, :]
    return {'image': images.astype(np.float32) / 127.5 - 1.0,   # [B, H, W, C] in [-1, 1]
            'label': self._labels[index]}                         # int32 [B]

  def _take(self) -> tuple[np.ndarray, np.ndarray]:
    """(indices [B], flips [B]) of the next local batch; the stream moves on by one."""
    n = len(self._labels)
    positions = self._next * self._global + self._offset + np.arange(self._local)  # [B]
    epochs, within = np.divmod(positions, n)
    index = np.empty(self._local, np.int64)
    flip = np.zeros(self._local, bool)
    for e in np.unique(epochs):
      sel = epochs == e
      perm, flips = self._epoch(int(e))
      index[sel] = perm[within[sel]]
      if flips is not None:
        flip[sel] = flips[within[sel]]
    self._next += 1
    return index, flip

  def get_state(self) -> bytes:
    return json.dumps({'next_index': self._next}).encode()

  def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    self._next = int(state['next_index'])

  def start_prefetch(self) -> None:
    """For grain's checkpoint handler, which calls it after a restore: nothing to start."""


def load_split(dataset: str, data_dir: str | os.PathLike[str] | None,
               split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """Every example of a prepared split: uint8 images `[N, H, W, C]` and int32 labels `[N]`
  (zeros when the dataset has none)."""
  source, info = _open_split(dataset, data_dir, split)
  n = len(source)
  images = np.empty((n,) + tuple(info.image_shape), np.uint8)
  labels = np.zeros((n,), np.int32)
  for i in range(n):
    example = source[i]
    images[i] = example['image']
    labels[i] = example.get('label', 0)
  return images, labels


def create_memory_train_iterator(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int = 0,
    process_count: int = 1,
    split: str = 'train',
) -> InMemoryTrainIterator:
  """`create_train_iterator`'s stream (other order, same sharding and batches) from the split
  loaded into host memory: an `InMemoryTrainIterator`."""
  _local_batch_size(global_batch_size, process_index, process_count)
  images, labels = load_split(dataset, data_dir, split)
  return InMemoryTrainIterator(images, labels, global_batch_size=global_batch_size, seed=seed,
                               random_flip=random_flip, process_index=process_index,
                               process_count=process_count)
