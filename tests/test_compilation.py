"""Compiling once and feeding the devices: the persistent compilation cache (fills, then hits
in a new process; unwritable or damaged, one warning line and the run goes on), what
`compilation.track` counts, and batches placed on the devices before the step that needs
them (data/prefetch.py, and the trainer's loop)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import workdirs  # tests/ is on sys.path under pytest's rootdir conftest

from configs import tiny
from diffusion_jax.runtime import compilation
from diffusion_jax.runtime import parallel
from diffusion_jax.training import loop as train
from diffusion_jax.data import input_pipeline
from diffusion_jax.data.prefetch import DevicePrefetcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------
# In process.
# ------------------------------------------------------------------------------------------


def test_default_cache_dir_rule(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert compilation.default_cache_dir() == str(tmp_path / 'jax')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compilation.default_cache_dir() == str(tmp_path / 'xdg' / 'diffusion_jax' / 'xla')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compilation.default_cache_dir() == str(tmp_path / 'home' / '.cache' / 'diffusion_jax'
                                                / 'xla')
  for off in ('0', 'false', 'Off'):
    monkeypatch.setenv('DIFFUSION_JAX_COMPILATION_CACHE', off)
    assert not compilation.cache_enabled_by_environment()
  monkeypatch.setenv('DIFFUSION_JAX_COMPILATION_CACHE', '1')
  assert compilation.cache_enabled_by_environment()


def test_track_counts_the_programs_compiled_in_the_block():
  x = np.arange(7.0, dtype=np.float32)  # a shape no other test compiles this function for
  with compilation.track('two', log=False) as report:
    jax.jit(lambda v: jnp.sin(v) * 3.0)(x).block_until_ready()
    jax.jit(lambda v: jnp.cos(v) + 2.0)(x).block_until_ready()
  assert report.programs == 2
  assert report.compile_seconds > 0 and report.lower_seconds > 0
  assert report.cache == 'off'  # no persistent cache in this process
  assert report.line().startswith('compiled two: ') and '2 programs' in report.line()
  with compilation.track('new_function', log=False) as fresh:
    jax.jit(lambda v: v)(x)  # a new function object, even one seen before: one more program
  assert fresh.programs == 1
  assert set(report.scalars()) == {'compile/two_seconds', 'compile/two_programs',
                                   'compile/two_cache_hits'}


def test_a_second_call_of_the_same_program_compiles_nothing():
  x = np.arange(5.0, dtype=np.float32)  # a shape no other test compiles this function for
  program = jax.jit(lambda v, k: jnp.tanh(v) * k, static_argnums=1)
  with compilation.track('first', log=False) as first:
    program(x, 2.0).block_until_ready()
  assert first.programs == 1
  with compilation.track('second', log=False) as second:  # the same program: nothing compiles
    program(x, 2.0).block_until_ready()
    program(x + 1.0, 2.0).block_until_ready()  # new values, same shapes and static arguments
  assert second.programs == 0, second.line()
  assert second.cache == 'none' and 'nothing to compile' in second.line()


class _Counting:
  """A host iterator of numbered batches whose state is the count handed out."""

  def __init__(self, n_dev):
    self.read = 0
    self._n = n_dev

  def __next__(self):
    self.read += 1
    return {'image': np.full((2 * self._n, 4), self.read, np.float32)}

  def get_state(self):
    return {'next_index': self.read}


def test_device_prefetcher_places_the_next_batches_before_handing_one_out():
  mesh = parallel.make_mesh()
  sharding = NamedSharding(mesh, P('data'))
  source = _Counting(jax.device_count())
  batches = DevicePrefetcher(source, sharding, ahead=2)
  for k in range(1, 6):
    batch = next(batches)
    assert np.asarray(batch['image'])[0, 0] == k  # in order
    assert source.read == k + 2 and batches.placed == k + 2  # k+1 and k+2 already placed
    queued = batches.queued
    assert [np.asarray(q['image'])[0, 0] for q in queued] == [k + 1, k + 2]
    for q in queued:
      assert isinstance(q['image'], jax.Array) and q['image'].sharding == sharding
    # The position recorded for a checkpoint is that of the batches handed out.
    assert json.loads(batches.get_state()) == {'next_index': k}
    frozen = batches.snapshot()
  next(batches)
  assert json.loads(frozen.get_state()) == {'next_index': 5}


@pytest.mark.slow
@pytest.mark.parametrize('steps_per_call', [1, 2])
def test_the_trainer_places_the_next_batch_before_each_step(monkeypatch, tmp_path,
                                                            steps_per_call):
  """The loop's update is called with a batch already on the devices, and by then the next
  batch has been read and placed too (no timing: the prefetcher's queue is inspected when the
  step is dispatched). With 2 steps per call, each call's batch is 2 batches stacked."""
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  digits.prepare_digits(data_dir)
  prefetchers = []
  k = steps_per_call

  class Recording(DevicePrefetcher):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      prefetchers.append(self)

  def negligible(state, batch, rng, **unused):  # the per-device step, without a U-Net
    del rng, unused
    m = jax.lax.pmean(jnp.mean(batch['image']), 'data')
    return state.replace(step=state.step + 1), dict(
        loss=m, mse=m, vb=m, grad_norm=m + 1.0, learning_rate=jnp.float32(1e-3))

  seen = []
  real_data_parallel_step = train.step_lib.data_parallel_step

  def recording_step(step_fn, mesh, steps_per_call):
    update = real_data_parallel_step(step_fn, mesh, steps_per_call)
    batch_sharding = NamedSharding(mesh, P('data') if k == 1 else P(None, 'data'))
    shape = (16, 8, 8, 1) if k == 1 else (k, 16, 8, 8, 1)

    def checked(state, batch):
      (prefetcher,) = prefetchers
      queued = prefetcher.queued
      seen.append((isinstance(batch['image'], jax.Array) and
                   batch['image'].sharding == batch_sharding and
                   batch['image'].shape == shape,
                   len(queued),
                   all(isinstance(q['image'], jax.Array) and
                       q['image'].sharding == batch_sharding for q in queued)))
      return update(state, batch)
    checked.batch_sharding = update.batch_sharding
    return checked

  monkeypatch.setattr(train.step_lib, 'train_step', negligible)
  monkeypatch.setattr(train.step_lib, 'data_parallel_step', recording_step)
  monkeypatch.setattr(train, 'DevicePrefetcher', Recording)
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.training.num_train_steps = 6
  config.training.steps_per_call = k
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert train.PREFETCH_BATCHES >= 1
  calls = 6 // k
  assert seen == [(True, train.PREFETCH_BATCHES, True)] * calls  # the next batch is placed
  # The checkpoint of the last step records 6 batches consumed, not those read ahead.
  (data_file,) = (tmp_path / 'wd' / 'checkpoints' / '6' / 'data').glob('process_*.json')
  assert json.loads(data_file.read_text()) == {'next_index': 6}
  assert prefetchers[0].placed == calls + train.PREFETCH_BATCHES


# ------------------------------------------------------------------------------------------
# The entry points, in child processes (each with its own cache folder).
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def env(child_env):
  config = tiny.get_config()
  config.data.data_dir = child_env['data_dir']
  info = input_pipeline.dataset_info('digits', child_env['data_dir'])
  workdir = workdirs.write_workdir(str(child_env['base'] / 'wd'), config, info)
  e = dict(child_env['env'])
  e.pop('JAX_COMPILATION_CACHE_DIR')  # each test names its own folder
  return dict(child_env, env=e, workdir=workdir)


def _sample(env, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'),
                         f'--workdir={env["workdir"]}', '--num_samples=8', '--sampler=ddim',
                         '--steps=2', '--overwrite', *args],
                        env=env['env'], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _compiled_lines(log: str) -> list[str]:
  return [line.split('] ', 1)[-1] for line in log.splitlines() if '] compiled ' in line]


@pytest.mark.slow
def test_train_fills_a_fresh_cache_and_a_new_process_hits_it(env, tmp_path):
  cache = tmp_path / 'cache'
  logs = []
  for run in ('first', 'second'):
    result = subprocess.run(
        workdirs.train_cmd(env['data_dir'], str(tmp_path / run), '--config.training.'
                           'num_train_steps=1', f'--compilation_cache_dir={cache}'),
        env=env['env'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    logs.append(result.stderr)
    if run == 'first':
      assert len(list(cache.iterdir())) >= 2  # the train step and the initial state
  first, second = (_compiled_lines(log) for log in logs)
  step_line = [line for line in first if line.startswith('compiled train_step:')]
  assert len(step_line) == 1 and step_line[0].endswith('cache miss'), first
  step_line = [line for line in second if line.startswith('compiled train_step:')]
  assert len(step_line) == 1 and step_line[0].endswith('cache hit'), second
  init_line = [line for line in second if line.startswith('compiled init_state:')]
  assert init_line and init_line[0].endswith('cache hit'), second
  # The start-up timeline, once, at the first step.
  timeline = [line for line in logs[1].splitlines() if '] startup: ' in line]
  assert len(timeline) == 1
  for phase in ('imports', 'data', 'model init', 'first step', 'cache hit',
                'first step done'):
    assert phase in timeline[0], timeline[0]


@pytest.mark.slow
def test_sample_reports_its_compile_and_hits_the_cache_in_a_new_process(env, tmp_path):
  cache = tmp_path / 'cache'
  first = _sample(env, f'--compilation_cache_dir={cache}')
  second = _sample(env, f'--compilation_cache_dir={cache}')
  for result in (first, second):
    assert result.returncode == 0, result.stderr[-3000:]
  assert 'cache miss)' in first.stdout and 'cache hit)' in second.stdout, (first.stdout,
                                                                           second.stdout)
  (line,) = [l for l in _compiled_lines(second.stderr) if l.startswith('compiled sampler:')]
  assert line.endswith('cache hit')


@pytest.mark.slow
def test_an_unwritable_cache_is_one_warning_and_the_run_succeeds(env, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  result = _sample(env, f'--compilation_cache_dir={blocker / "cache"}')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stderr.splitlines() if 'compilation cache' in l.lower()
              and l.startswith('W')]
  assert len(warnings) == 1 and 'cannot write to' in warnings[0], result.stderr[-3000:]
  assert (pathlib.Path(env['workdir']) / 'samples_ddim_2' / 'samples.npz').exists()
  assert 'cache off)' in result.stdout


@pytest.mark.slow
def test_a_damaged_cache_is_one_warning_and_the_run_succeeds(env, tmp_path):
  cache = tmp_path / 'cache'
  assert _sample(env, f'--compilation_cache_dir={cache}').returncode == 0
  entries = [p for p in cache.rglob('*') if p.is_file()]
  assert len(entries) >= 2
  for p in entries:  # every entry damaged: what a truncated write or a bad disk leaves
    p.write_bytes(b'\x00garbage' * 7)
  result = _sample(env, f'--compilation_cache_dir={cache}')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stderr.splitlines() if 'compilation cache' in l
              and l.startswith('W')]
  assert len(warnings) == 1 and 'compiling instead' in warnings[0], result.stderr[-3000:]
  images = np.load(pathlib.Path(env['workdir']) / 'samples_ddim_2' / 'samples.npz')['images']
  assert images.shape == (8, 8, 8, 1)


@pytest.mark.slow
def test_the_cache_can_be_turned_off(env, tmp_path):
  e = dict(env['env'], JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'by_env'))
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'),
                           f'--workdir={env["workdir"]}', '--num_samples=8', '--sampler=ddim',
                           '--steps=2', '--overwrite', '--nocompilation_cache'],
                          env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'cache off)' in result.stdout
  assert not (tmp_path / 'by_env').exists() or not any((tmp_path / 'by_env').iterdir())
  e = dict(env['env'], DIFFUSION_JAX_COMPILATION_CACHE='0')
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'),
                           f'--workdir={env["workdir"]}', '--num_samples=8', '--sampler=ddim',
                           '--steps=2', '--overwrite'],
                          env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and 'cache off)' in result.stdout, result.stderr[-3000:]
