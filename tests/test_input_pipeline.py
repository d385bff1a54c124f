"""Tests for the digits dataset and the grain input pipeline (CPU, no TensorFlow)."""

import collections
import importlib.util
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from diffusion_jax.data import digits
from diffusion_jax.data import input_pipeline

# Both splits of the digits dataset, derived here from scikit-learn alone.
NUM_TRAIN, NUM_TEST = 1500, 297


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  digits.prepare_digits(path)
  return str(path)


@pytest.fixture(scope='module')
def expected_splits():
  """{'train'|'test': (uint8 images [N, 8, 8, 1], int labels [N])}, from load_digits."""
  raw = sk_datasets.load_digits()
  # Integer rounding of v * 255 / 16, halves up (only v = 8 has a half: 127.5 -> 128).
  images = ((raw.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)[..., None]
  order = np.random.RandomState(0).permutation(len(images))
  split = {'train': np.sort(order[:NUM_TRAIN]), 'test': np.sort(order[NUM_TRAIN:])}
  return {name: (images[idx], raw.target[idx]) for name, idx in split.items()}


def _train(data_dir, **kwargs):
  kwargs = {'global_batch_size': 100, 'seed': 7, 'random_flip': False, **kwargs}
  return input_pipeline.create_train_iterator('digits', data_dir, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _examples(batches, with_mask=False):
  """Multiset of (image, label) in model units; uint8 images round-trip exactly."""
  counts = collections.Counter()
  for batch in batches:
    keep = batch['mask'] if with_mask else np.ones(len(batch['label']), bool)
    pixels = np.rint((batch['image'][keep] + 1.0) * 127.5).astype(np.uint8)
    for image, label in zip(pixels, batch['label'][keep]):
      counts[image.tobytes(), int(label)] += 1
  return counts


def _as_examples(images, labels):
  return collections.Counter(
      (image.tobytes(), int(label)) for image, label in zip(images, labels)
  )


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      assert want[key].dtype == got[key].dtype
      assert want[key].tobytes() == got[key].tobytes(), key


# ------------------------------------------------------------- the dataset --


def test_digits_splits_equal_scaled_sklearn_digits(data_dir, expected_splits):
  for split, (images, labels) in expected_splits.items():
    source = tfds.data_source('digits', split=split, data_dir=data_dir, download=False)
    assert len(source) == {'train': NUM_TRAIN, 'test': NUM_TEST}[split]
    got = [source[i] for i in range(len(source))]
    np.testing.assert_array_equal(np.stack([g['image'] for g in got]), images)
    np.testing.assert_array_equal([g['label'] for g in got], labels)
    assert got[0]['image'].dtype == np.uint8


def test_prepare_digits_is_idempotent(data_dir):
  version_dir = os.path.join(data_dir, 'digits', '1.0.0')
  before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
  digits.prepare_digits(data_dir)
  after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
  assert before == after


def test_dataset_info(data_dir):
  info = input_pipeline.dataset_info('digits', data_dir)
  assert info.image_shape == (8, 8, 1)
  assert info.num_classes == 10
  assert dict(info.num_examples) == {'train': NUM_TRAIN, 'test': NUM_TEST}


def test_digits_is_prepared_on_first_use(tmp_path):
  batch = next(_train(str(tmp_path), global_batch_size=4))
  assert batch['image'].shape == (4, 8, 8, 1)


# ---------------------------------------------------------------- training --


def test_train_batch_shapes_dtypes_and_range(data_dir):
  for batch in _take(_train(data_dir, global_batch_size=64, random_flip=True), 3):
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (64, 8, 8, 1) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert set(np.unique(batch['label'])) <= set(range(10))
  # Some pixels reach both ends of the range: 0 -> -1 and 255 -> +1.
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0


@pytest.mark.slow
def test_process_shares_partition_each_global_batch(data_dir, expected_splits):
  steps_per_epoch = NUM_TRAIN // 100
  single = _take(_train(data_dir, random_flip=True), steps_per_epoch)
  shares = [
      _take(_train(data_dir, random_flip=True, process_index=p, process_count=2), steps_per_epoch)
      for p in (0, 1)
  ]
  for p in (0, 1):
    assert shares[p][0]['image'].shape == (50, 8, 8, 1)
  # Flipped or not, the two halves of each step, concatenated in process order, are the
  # single process's batch in the same order (so the global array is layout-independent).
  for step in range(steps_per_epoch):
    halves = [shares[0][step], shares[1][step]]
    assert _examples(halves) == _examples([single[step]])
    for key in ('image', 'label'):
      joined = np.concatenate([h[key] for h in halves])
      assert joined.tobytes() == single[step][key].tobytes(), (step, key)

  # Without flips, one epoch over both processes is the train split exactly once.
  plain = [
      _examples(_take(_train(data_dir, process_index=p, process_count=2), steps_per_epoch))
      for p in (0, 1)
  ]
  assert not set(plain[0]) & set(plain[1])
  assert plain[0] + plain[1] == _as_examples(*expected_splits['train'])


@pytest.mark.slow
def test_each_epoch_is_a_new_permutation(data_dir, expected_splits):
  steps_per_epoch = NUM_TRAIN // 100
  batches = _take(_train(data_dir), 2 * steps_per_epoch)
  epochs = [batches[:steps_per_epoch], batches[steps_per_epoch:]]
  train = _as_examples(*expected_splits['train'])
  for epoch in epochs:
    assert _examples(epoch) == train
  labels = [np.concatenate([b['label'] for b in epoch]) for epoch in epochs]
  assert not np.array_equal(labels[0], labels[1])
  # Shuffled, not in the stored order.
  assert not np.array_equal(labels[0], expected_splits['train'][1])


def test_stream_is_determined_by_seed(data_dir):
  first = _take(_train(data_dir, seed=3, random_flip=True), 4)
  _assert_batches_equal(first, _take(_train(data_dir, seed=3, random_flip=True), 4))
  other = _take(_train(data_dir, seed=4, random_flip=True), 4)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


def test_random_flip_mirrors_about_half_the_images(data_dir):
  plain = _take(_train(data_dir, seed=5), 3)
  flipped = _take(_train(data_dir, seed=5, random_flip=True), 3)
  num_mirrored = num_same = 0
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a['label'], b['label'])  # Same order.
    for x, y in zip(a['image'], b['image']):  # [8, 8, 1] each.
      if np.array_equal(x, y):
        num_same += 1
      else:
        np.testing.assert_array_equal(y, x[:, ::-1, :])
        num_mirrored += 1
  assert 90 < num_mirrored < 210 and num_mirrored + num_same == 300


def test_random_flip_off_yields_stored_images(data_dir, expected_splits):
  images, _ = expected_splits['train']
  stored = {image.tobytes() for image in images}
  batch = next(_train(data_dir, random_flip=False))
  pixels = np.rint((batch['image'] + 1.0) * 127.5).astype(np.uint8)
  assert all(image.tobytes() in stored for image in pixels)


# ----------------------------------------------------------- checkpointing --


@pytest.mark.slow
@pytest.mark.parametrize('prefetch_batches', [0, 2])
def test_restored_state_continues_bit_identically(data_dir, prefetch_batches):
  kwargs = dict(global_batch_size=64, seed=11, random_flip=True, prefetch_batches=prefetch_batches)
  uninterrupted = _take(_train(data_dir, **kwargs), 27)  # Epoch 1 starts in step 23.

  interrupted = _train(data_dir, **kwargs)
  _take(interrupted, 21)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = _train(data_dir, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(uninterrupted[21:], _take(resumed, 6))


def test_iterator_position_roundtrips_through_orbax_checkpoint_manager(data_dir, tmp_path):
  kwargs = dict(global_batch_size=32, seed=2, random_flip=True)
  train_iter = _train(data_dir, **kwargs)
  _take(train_iter, 5)
  params = {'w': jnp.arange(3.0)}

  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  manager.save(5, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      data=grain.checkpoint.CheckpointSave(train_iter),
  ))
  # The iterator's position is read during `save`, before it moves on.
  expected = _take(train_iter, 4)
  manager.wait_until_finished()
  manager.close()

  fresh = _train(data_dir, **kwargs)
  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      params=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, params)),
      data=grain.checkpoint.CheckpointRestore(fresh),
  ))
  manager.close()
  assert restored['data'] is fresh  # Restored in place.
  np.testing.assert_array_equal(restored['params']['w'], params['w'])
  _assert_batches_equal(expected, _take(fresh, 4))


# -------------------------------------------------------------- evaluation --


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_test_example_once(data_dir, expected_splits, process_count):
  global_batch_size = 64  # 297 = 4 * 64 + 41: the last global batch is padded.
  shares = [
      list(input_pipeline.create_eval_iterator(
          'digits', data_dir, global_batch_size=global_batch_size,
          process_index=p, process_count=process_count))
      for p in range(process_count)
  ]
  local = global_batch_size // process_count
  for batches in shares:
    assert len(batches) == 5  # The same number of steps on every process.
    for batch in batches:
      assert batch['image'].shape == (local, 8, 8, 1) and batch['image'].dtype == np.float32
      assert batch['label'].dtype == np.int32
      assert batch['mask'].shape == (local,) and batch['mask'].dtype == bool
  all_batches = [b for batches in shares for b in batches]
  assert sum(int(b['mask'].sum()) for b in all_batches) == NUM_TEST
  assert _examples(all_batches, with_mask=True) == _as_examples(*expected_splits['test'])
  for batch in all_batches:
    assert not batch['image'][~batch['mask']].any()  # Padding is zeros.
  if process_count == 1:  # In stored order, unflipped.
    images = np.concatenate([b['image'] for b in shares[0]])[:NUM_TEST]
    np.testing.assert_array_equal(
        images, expected_splits['test'][0].astype(np.float32) / 127.5 - 1.0
    )


# ------------------------------------------------------------- bad inputs --


@pytest.mark.parametrize(
    'kwargs, error, pattern',
    [
        (dict(global_batch_size=0), ValueError, 'global_batch_size.*0'),
        (dict(global_batch_size=-8), ValueError, 'global_batch_size.*-8'),
        (dict(global_batch_size=10, process_count=3), ValueError,
         'global_batch_size=10.*process_count=3'),
        (dict(process_index=2, process_count=2), ValueError, 'process_index.*2'),
        (dict(seed=-1), ValueError, 'seed.*-1'),
        (dict(split='validation'), ValueError, "'validation'"),
    ],
)
def test_bad_arguments_raise_naming_the_value(data_dir, kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    _train(data_dir, **kwargs)


def test_eval_rejects_indivisible_batch(data_dir):
  with pytest.raises(ValueError, match='global_batch_size=9.*process_count=2'):
    input_pipeline.create_eval_iterator(
        'digits', data_dir, global_batch_size=9, process_count=2
    )


def test_unknown_dataset_raises(tmp_path):
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'"):
    input_pipeline.create_train_iterator(
        'no_such_dataset_xyz', str(tmp_path), global_batch_size=8, seed=0, random_flip=False
    )


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  pattern = r"'mnist'.*tfds build --file_format=array_record mnist"
  with pytest.raises(FileNotFoundError, match=pattern):
    input_pipeline.dataset_info('mnist', str(tmp_path))


@pytest.mark.skipif(
    importlib.util.find_spec('tensorflow') is not None, reason='TensorFlow is installed'
)
def test_tfrecord_without_tensorflow_says_what_to_install(tmp_path):
  with pytest.raises(ImportError, match=r"'cifar10'.*diffusion-jax\[tf\].*array_record"):
    input_pipeline._load_tfrecord_split('cifar10', str(tmp_path), 'train')  # pylint: disable=protected-access


# ------------------------------------------------------------- in memory --


def _memory(data_dir, **kwargs):
  kwargs = {'global_batch_size': 100, 'seed': 7, 'random_flip': False, **kwargs}
  return input_pipeline.create_memory_train_iterator('digits', data_dir, **kwargs)


def test_memory_stream_epochs_are_new_permutations_of_the_split(data_dir, expected_splits):
  steps_per_epoch = NUM_TRAIN // 100
  batches = _take(_memory(data_dir), 2 * steps_per_epoch)
  assert batches[0]['image'].shape == (100, 8, 8, 1) and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].dtype == np.int32
  train = _as_examples(*expected_splits['train'])
  epochs = [batches[:steps_per_epoch], batches[steps_per_epoch:]]
  for epoch in epochs:
    assert _examples(epoch) == train  # every training digit exactly once, nothing else
  labels = [np.concatenate([b['label'] for b in epoch]) for epoch in epochs]
  assert not np.array_equal(labels[0], labels[1])
  assert not np.array_equal(labels[0], expected_splits['train'][1])


def test_memory_stream_is_the_seeds_permutation(data_dir, expected_splits):
  # The documented order, derived here: epoch e is default_rng([seed, e]).permutation(N).
  images, labels = expected_splits['train']
  batch = next(_memory(data_dir, seed=3, global_batch_size=64))
  order = np.random.default_rng([3, 0]).permutation(NUM_TRAIN)[:64]
  np.testing.assert_array_equal(batch['label'], labels[order])
  np.testing.assert_array_equal(batch['image'], images[order].astype(np.float32) / 127.5 - 1)


def test_memory_stream_flips_about_half_deterministically(data_dir):
  plain = _take(_memory(data_dir, seed=5), 3)
  flipped = _take(_memory(data_dir, seed=5, random_flip=True), 3)
  again = _take(_memory(data_dir, seed=5, random_flip=True), 3)
  _assert_batches_equal(flipped, again)
  mirrored = 0
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a['label'], b['label'])
    for x, y in zip(a['image'], b['image']):
      if not np.array_equal(x, y):
        np.testing.assert_array_equal(y, x[:, ::-1, :])
        mirrored += 1
  # Binomial(300, 1/2): 150 ± 8.7; a symmetric image counts as not mirrored, so the interval
  # is wide on the low side.
  assert 90 < mirrored < 185


def test_memory_stream_process_shares_partition_each_global_batch(data_dir):
  single = _take(_memory(data_dir, random_flip=True), 20)  # crosses into epoch 2
  shares = [_take(_memory(data_dir, random_flip=True, process_index=p, process_count=4), 20)
            for p in range(4)]
  for step in range(20):
    for key in ('image', 'label'):
      joined = np.concatenate([shares[p][step][key] for p in range(4)])
      assert joined.tobytes() == single[step][key].tobytes(), (step, key)


def test_memory_stream_resumes_bit_identically_through_grains_handler(data_dir, tmp_path):
  kwargs = dict(global_batch_size=64, seed=11, random_flip=True)
  uninterrupted = _take(_memory(data_dir, **kwargs), 27)  # epoch 1 starts in step 23
  interrupted = _memory(data_dir, **kwargs)
  _take(interrupted, 21)
  assert json.loads(interrupted.get_state()) == {'next_index': 21}  # grain's own format
  manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data',))
  manager.save(21, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(interrupted)))
  manager.wait_until_finished()
  resumed = _memory(data_dir, **kwargs)
  manager.restore(21, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(uninterrupted[21:], _take(resumed, 6))


def test_memory_stream_bad_arguments(data_dir):
  with pytest.raises(ValueError, match=r'global_batch_size=100 is not divisible by '
                                       r'process_count=3'):
    _memory(data_dir, process_count=3)
  with pytest.raises(ValueError, match=r'seed must be a non-negative int, got -1'):
    _memory(data_dir, seed=-1)
  with pytest.raises(ValueError, match=r"unknown data.pipeline 'fast'; allowed: 'grain', "
                                       r"'memory'"):
    input_pipeline.DataPipeline.parse('fast')
