"""The fake GCS server (tests/fake_gcs.py) is faithful enough for our clients: epath (gcsfs),
TensorStore's gcs driver and an orbax CheckpointManager all work on `gs://test-bucket`, the bytes
live only in the server's memory, and no local directory appears under any name.

What orbax 0.12.8 does on gs:// (seen here): no `*.orbax-checkpoint-tmp` folder and no rename.
It writes straight into `ckpt/<step>/` and commits with `commit_success.txt` markers (one per
step, one per item); the arrays go through TensorStore (OCDBT, conditional uploads), the
metadata files through epath/gcsfs; it asks google-cloud-storage once per bucket whether the
bucket has a hierarchical namespace; max_to_keep deletes the objects of old steps.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import fsspec
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.path import gcs_utils

try:
  from tests import fake_gcs as fake_gcs_lib
  from tests import oracles
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import fake_gcs as fake_gcs_lib
  import oracles

API_PREFIXES = ('/storage/v1/', '/upload/storage/v1/', '/download/storage/v1/')


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
  """Runs the test in an empty directory; a path misread as local would land in it."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return cwd


def _assert_nothing_local(cwd):
  assert not list(cwd.iterdir()), f'local files appeared: {list(cwd.iterdir())}'
  for local in ('/gs/test-bucket', '/gs:', 'gs:', 'test-bucket', '/test-bucket'):
    assert not os.path.exists(local), f'a local directory {local} appeared'


def _assert_only_gcs_api(server):
  """Every request was a GCS API call: none went to the metadata server (GCE credentials)."""
  others = [entry for entry in server.log if not entry[1].startswith(API_PREFIXES)]
  assert not others, others


@pytest.mark.slow
def test_epath_operations(fake_gcs, fake_gcs_server, empty_cwd):
  rng = np.random.default_rng(oracles.new_seed())
  root = epath.Path(fake_gcs) / 'run'
  assert root._backend is epath.backend.fsspec_backend  # pylint: disable=protected-access
  assert not root.exists()
  root.mkdir()  # GCS has no directories: a no-op that must not fail
  (root / 'config.json').write_text('{"lr": 0.001}')
  (root / 'a' / 'b').mkdir(parents=True, exist_ok=True)
  (root / 'a' / 'b' / 'x.txt').write_text('x')
  (root / 'a' / 'y.txt').write_text('y')
  # Large enough for several resumable-upload chunks and ranged reads.
  big = rng.integers(0, 256, size=(13 << 20) // 2 + 12_345, dtype=np.uint8).tobytes()
  (root / 'big.bin').write_bytes(big)

  assert fake_gcs_server.names() == ['run/a/b/x.txt', 'run/a/y.txt', 'run/big.bin',
                                     'run/config.json']
  assert fake_gcs_server.objects[('test-bucket', 'run/big.bin')].data == big
  assert json.loads((root / 'config.json').read_text()) == {'lr': 0.001}
  assert (root / 'big.bin').read_bytes() == big
  with (root / 'big.bin').open('rb') as f:  # ranged reads
    f.seek(5_000_001)
    assert f.read(777) == big[5_000_001:5_000_778]
  assert (root / 'big.bin').stat().length == len(big)
  assert root.exists() and root.is_dir() and (root / 'a' / 'b').is_dir()
  assert (root / 'a' / 'y.txt').is_file() and not (root / 'nope').exists()
  assert sorted(p.name for p in root.iterdir()) == ['a', 'big.bin', 'config.json']
  assert sorted(str(p) for p in root.glob('a/*.txt')) == [f'{fake_gcs}/run/a/y.txt']
  assert sorted(p.name for p in root.glob('*/*/*.txt')) == ['x.txt']
  with pytest.raises(NotImplementedError):  # epath refuses recursive globs on gs://
    list(root.glob('**/*.txt'))

  (root / 'a').rename(root / 'c')  # a "directory" rename: copies and deletes every object
  assert fake_gcs_server.names() == ['run/big.bin', 'run/c/b/x.txt', 'run/c/y.txt',
                                     'run/config.json']
  assert (root / 'c' / 'b' / 'x.txt').read_text() == 'x' and not (root / 'a').exists()
  (root / 'config.json').unlink()
  (root / 'c').rmtree()
  assert fake_gcs_server.names() == ['run/big.bin']
  root.rmtree()
  assert fake_gcs_server.names() == [] and not root.exists()
  _assert_nothing_local(empty_cwd)
  _assert_only_gcs_api(fake_gcs_server)


def test_listing_pages_and_exclusive_create(fake_gcs, fake_gcs_server):
  """gcsfs pages through 1,000-entry listings; `mode='create'` (ifGenerationMatch=0) refuses an
  existing object with FileExistsError, as GCS's 412 does."""
  n = 2_345
  for i in range(n):  # straight into the store: 2,345 uploads would be slow
    fake_gcs_server.objects[('test-bucket', f'many/{i:05d}')] = fake_gcs_lib.Blob(
        b'%d' % i, i + 1, 'application/octet-stream', 0.0)
  names = [p.name for p in (epath.Path(fake_gcs) / 'many').iterdir()]
  assert sorted(names) == [f'{i:05d}' for i in range(n)]
  assert sum(1 for _, target, _ in fake_gcs_server.log if 'pageToken=' in target) == 2

  fs = epath.backend.fsspec_backend.fs(fake_gcs)
  fs.pipe(f'{fake_gcs}/once', b'1', mode='create')
  with pytest.raises(FileExistsError):
    fs.pipe(f'{fake_gcs}/once', b'2', mode='create')
  assert fake_gcs_server.objects[('test-bucket', 'once')].data == b'1'
  fs.pipe(f'{fake_gcs}/crlf', b'\r\n--\r\nends in CR\r')  # a multipart upload's body is exact
  assert fake_gcs_server.objects[('test-bucket', 'crlf')].data == b'\r\n--\r\nends in CR\r'
  fs.cp_file(f'{fake_gcs}/once', f'{fake_gcs}/twice')  # objects.rewrite
  once, twice = (fake_gcs_server.objects[('test-bucket', n)] for n in ('once', 'twice'))
  assert twice.data == b'1' and twice.generation > once.generation


def test_list_protocol_directly(fake_gcs_server):
  """The list call against an independent reading of the API: prefixes collapse at the
  delimiter, maxResults counts prefixes and items, pageToken resumes after the last entry."""
  names = ['d/a', 'd/b/1', 'd/b/2', 'd/c', 'd/e/1', 'x']
  for i, name in enumerate(names):
    fake_gcs_server.objects[('test-bucket', name)] = fake_gcs_lib.Blob(b'', i + 1, 't', 0.0)
  try:
    pages, token = [], None
    for _ in range(10):  # a server that ignored pageToken would repeat forever
      url = f'{fake_gcs_server.url}/storage/v1/b/test-bucket/o?prefix=d/&delimiter=/&maxResults=2'
      with urllib.request.urlopen(url + (f'&pageToken={token}' if token else '')) as r:
        page = json.load(r)
      pages.append(([i['name'] for i in page['items']], page['prefixes']))
      token = page.get('nextPageToken')
      if token is None:
        break
    assert token is None and pages == [(['d/a'], ['d/b/']), (['d/c'], ['d/e/'])]
    with pytest.raises(urllib.error.HTTPError) as e:  # what the fake lacks, it says
      urllib.request.urlopen(urllib.request.Request(
          f'{fake_gcs_server.url}/storage/v1/b/test-bucket/o/d%2Fa/compose', method='POST'))
    assert e.value.code == 501
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(f'{fake_gcs_server.url}/storage/v1/b/test-bucket/o/x?generation=1')
    assert e.value.code == 501
  finally:
    fake_gcs_server.reset()


def _kvstore_story(kv):
  """Conditional writes, reads and deletes on `kv`; generations replaced by their order of
  appearance ('' where TensorStore reports the unknown generation: a condition failed)."""
  seen = {}

  def gen(stamp):
    return '' if stamp.generation == b'' else seen.setdefault(stamp.generation, len(seen))

  story = []
  missing = kv.read('k').result()
  no_value = missing.stamp.generation
  story.append(('read missing', missing.state, gen(missing.stamp)))
  first = kv.write('k', b'one', if_equal=no_value).result()
  story.append(('create', gen(first)))
  story.append(('create again', gen(kv.write('k', b'two', if_equal=no_value).result())))
  second = kv.write('k', b'two', if_equal=first.generation).result()
  story.append(('replace current', gen(second)))
  story.append(('replace stale', gen(kv.write('k', b'3', if_equal=first.generation).result())))
  for name, kwargs in [('read', {}), ('read unchanged', {'if_not_equal': second.generation}),
                       ('read changed', {'if_not_equal': first.generation}),
                       ('read range', {'byte_range': slice(1, 3)}),
                       ('read suffix', {'byte_range': slice(-2, None)})]:
    r = kv.read('k', **kwargs).result()
    story.append((name, r.state, r.value, gen(r.stamp)))
  story.append(('delete stale', gen(kv.write('k', None, if_equal=first.generation).result())))
  kv.write('k2', b'x').result()
  story.append(('list', sorted(kv.list().result())))
  kv.write('k', None, if_equal=second.generation).result()
  story.append(('after delete', kv.read('k').result().state, sorted(kv.list().result())))
  return story


def test_tensorstore_matches_its_memory_driver(fake_gcs, fake_gcs_server):
  """TensorStore's gcs driver on the fake gives the same answers as its in-memory driver (the
  reference) for conditional writes and deletes, conditional and ranged reads and listing."""
  gcs = ts.KvStore.open({'driver': 'gcs', 'bucket': 'test-bucket', 'path': 'kv/'}).result()
  memory = ts.KvStore.open({'driver': 'memory'}).result()
  story = _kvstore_story(gcs)
  assert story == _kvstore_story(memory)
  assert ('replace stale', '') in story and ('read range', 'value', b'wo', 2) in story
  assert fake_gcs_server.names() == ['kv/k2']
  agents = {agent.split(' ')[0] for _, _, agent in fake_gcs_server.log}
  assert agents and all(a.startswith('tensorstore/') for a in agents), agents
  _assert_only_gcs_api(fake_gcs_server)


def test_gcsfs_listing_cache_hides_other_writers(fake_gcs, fake_gcs_server):
  """Pins a gcsfs behaviour that the library must allow for: once a process has listed a
  folder, gcsfs answers `exists`/`iterdir` under it from its listing cache, so objects written
  there by another client (TensorStore, another process or host) stay invisible, until the
  cache is off (`use_listings_cache=False`, e.g. FSSPEC_GCS_USE_LISTINGS_CACHE=false)."""
  root = epath.Path(fake_gcs) / 'listed'
  kv = ts.KvStore.open({'driver': 'gcs', 'bucket': 'test-bucket', 'path': 'listed/'}).result()
  (root / 'a').write_text('a')
  assert [p.name for p in root.iterdir()] == ['a']
  kv.write('b', b'b').result()
  assert fake_gcs_server.names() == ['listed/a', 'listed/b']
  assert [p.name for p in root.iterdir()] == ['a'] and not (root / 'b').exists()  # stale

  fsspec.config.conf['gcs']['use_listings_cache'] = False  # restored by the fixture
  fake_gcs_lib.clear_filesystem_caches()
  assert sorted(p.name for p in root.iterdir()) == ['a', 'b']
  kv.write('c', b'c').result()
  assert sorted(p.name for p in root.iterdir()) == ['a', 'b', 'c']
  assert (root / 'c').read_text() == 'c'


def _make_manager(directory):
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data'))


@pytest.mark.slow
def test_orbax_checkpoint_manager(fake_gcs, fake_gcs_server, empty_cwd):
  seed = oracles.new_seed()
  key = jax.random.key(seed)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  states = {}
  for step in (1, 2, 3):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, step), 3)
    states[step] = {
        'params': {'w': jax.random.normal(k1, (8, 3), jnp.float32),
                   'b': jax.device_put(jax.random.normal(k2, (16,), jnp.bfloat16), sharded)},
        'step': jnp.int32(step),
        'rng': jax.random.key_data(k3),
    }
  directory = epath.Path(fake_gcs) / 'ckpt'
  dataset = grain.MapDataset.range(100).shuffle(seed=seed % 1000).to_iter_dataset()
  iterator = iter(dataset)

  gcs_utils.get_bucket.cache_clear()  # orbax keeps the bucket object for the process
  manager = _make_manager(directory)
  for step in (1, 2, 3):
    for _ in range(step):
      next(iterator)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(states[step]),
        data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  manager.close()
  expected_next = next(iterator)  # what the restored iterator must yield

  names = fake_gcs_server.names()
  steps_stored = sorted({n.split('/')[1] for n in names if n.startswith('ckpt/')})
  assert steps_stored == ['2', '3'], names  # max_to_keep removed step 1's objects
  for step in ('2', '3'):
    assert f'ckpt/{step}/commit_success.txt' in names, names  # orbax's gs:// commit marker
    assert any(n.startswith(f'ckpt/{step}/state/') for n in names)
    assert any(n.startswith(f'ckpt/{step}/data/') for n in names)
  assert not [n for n in names if 'orbax-checkpoint-tmp' in n]
  # The array bytes went through TensorStore's gcs driver, not through a local file.
  ts_uploads = [t for m, t, agent in fake_gcs_server.log
                if m == 'POST' and agent.startswith('tensorstore/') and '/upload/' in t]
  assert ts_uploads
  # orbax asks google-cloud-storage whether the bucket has a hierarchical namespace.
  assert [a for m, t, a in fake_gcs_server.log
          if m == 'GET' and t.startswith('/storage/v1/b/test-bucket?')
          and a.startswith('gcloud-python/')]
  assert not gcs_utils.is_hierarchical_namespace_enabled(directory)

  manager = _make_manager(directory)
  assert manager.latest_step() == 3 and manager.all_steps() == [2, 3]
  for step in (2, 3):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, states[step])
    data_iterator = iter(dataset)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))['state']
    flat_r, tree_r = jax.tree.flatten(restored)
    flat_s, tree_s = jax.tree.flatten(states[step])
    assert tree_r == tree_s
    for got, want in zip(flat_r, flat_s):
      assert got.dtype == want.dtype and got.sharding == want.sharding, (got, want)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=f'step {step}, seed {seed}')
    if step == 3:
      assert next(data_iterator) == expected_next
  manager.close()
  _assert_nothing_local(empty_cwd)
  _assert_only_gcs_api(fake_gcs_server)


CHILD = r'''
import sys
from etils import epath
import tensorstore as ts
root = epath.Path(sys.argv[1])
print((root / 'from_parent.txt').read_text())
(root / 'from_child.txt').write_text('child')
kv = ts.KvStore.open({'driver': 'gcs', 'bucket': 'test-bucket', 'path': 'shared/'}).result()
kv.write('from_child.ts', b'tensorstore').result()
'''


@pytest.mark.slow
def test_child_process(fake_gcs, fake_gcs_server, empty_cwd):
  """A child process given `server.env()` reaches the same bucket with gcsfs and TensorStore."""
  root = epath.Path(fake_gcs) / 'shared'
  (root / 'from_parent.txt').write_text('parent')
  env = {**os.environ, **fake_gcs_server.env()}
  out = subprocess.run([sys.executable, '-c', CHILD, str(root)], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  assert out.stdout.strip() == 'parent', out.stderr
  assert fake_gcs_server.objects[('test-bucket', 'shared/from_child.txt')].data == b'child'
  assert (root / 'from_child.txt').read_text() == 'child'
  assert fake_gcs_server.objects[('test-bucket', 'shared/from_child.ts')].data == b'tensorstore'
  _assert_only_gcs_api(fake_gcs_server)
  _assert_nothing_local(empty_cwd)
