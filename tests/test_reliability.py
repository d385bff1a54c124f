"""Preemption and faults (issue 15): SIGTERM saves and resumes exactly, damaged checkpoints fall
back, one trainer per workdir, failed saves are one line, bad inputs are refused.

Trainer-level tests run `train.py` in child processes on the tiny config (real signals, a real
SIGKILL, a real full disk on a tmpfs, two processes on loopback) and compare final states
bit for bit, in every leaf and in the iterator position, with an unbroken run.
"""

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from diffusion_jax.storage import checkpointing
from diffusion_jax.runtime import preemption
from diffusion_jax.storage import workdir_lock

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles
import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('--config.training.num_train_steps=8', '--config.training.log_every_steps=1',
         '--config.training.keep_checkpoints=4')
EVERY_2 = STEPS + ('--config.training.checkpoint_every_steps=2',)
EVERY_4 = STEPS + ('--config.training.checkpoint_every_steps=4',)


@pytest.fixture(scope='module')
def env(child_env):
  return child_env


def _train_cmd(env, workdir, *overrides):
  return workdirs.train_cmd(env['data_dir'], workdir, *overrides)


def _run(env, cmd, e=None):
  return subprocess.run(cmd, env=e or env['env'], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def _error_line(result):
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert result.returncode not in (0, preemption.EXIT_CODE) and lines, (
      result.returncode, result.stderr[-4000:])
  return lines[-1]


def _steps(workdir):
  return sorted(checkpointing.candidate_steps(workdir))


@pytest.fixture
def unbroken(trained_workdir):
  """A copy of the run's trained tiny workdir: 8 steps with `EVERY_2`, checkpoints 2, 4, 6 and
  8 (conftest's `TRAINED_OVERRIDES`)."""
  assert _steps(trained_workdir) == [2, 4, 6, 8]
  return trained_workdir


@pytest.fixture
def reaper():
  """Popen objects appended to it are SIGKILLed (after SIGCONT) if the test leaves them running."""
  procs = []
  yield procs
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGCONT)
      p.kill()
      p.wait()


def _fault_env(env, fault):
  """The child environment with a fault planted (diffusion_jax/runtime/faults.py)."""
  return dict(env['env'], DIFFUSION_JAX_FAULT=fault)


def _wait_until_stopped(proc, log, timeout=600):
  """Waits until `proc` has stopped itself (state T in /proc): a state, not a time window."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, open(log).read()[-3000:]
    with open(f'/proc/{proc.pid}/stat') as f:
      if f.read().rsplit(')', 1)[1].split()[0] in ('T', 't'):
        return
    time.sleep(0.05)
  raise AssertionError(f'pid {proc.pid} did not stop: ' + open(log).read()[-3000:])


def _wait_for_line(path, pattern, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, open(path).read()[-3000:]
    if re.search(pattern, open(path).read()):
      return
    time.sleep(0.005)
  raise AssertionError(f'{pattern!r} not seen in {path}')


# ------------------------------------------------------------------------------------------
# SIGTERM, a second trainer, SIGKILL during an asynchronous save, a stale lock: one chain.
# ------------------------------------------------------------------------------------------


def test_sigterm_lock_and_sigkill_during_save_resume_bit_identically(env, unbroken, tmp_path,
                                                                     reaper):
  workdir = str(tmp_path / 'run')
  log = [str(tmp_path / f'log_{i}.txt') for i in range(3)]

  # 1. A trainer that stops itself (SIGSTOP) right after step 1, holding the lock...
  with open(log[0], 'w') as f:
    first = subprocess.Popen(_train_cmd(env, workdir, *EVERY_4),
                             env=_fault_env(env, 'after_step:1:stop'), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=f)
  reaper.append(first)
  _wait_until_stopped(first, log[0])
  # 2. ...so a second trainer on the workdir is refused, naming the holder.
  second = _run(env, _train_cmd(env, workdir, *EVERY_4))
  line = _error_line(second)
  for fragment in ('being trained by', f'pid {first.pid}', socket.gethostname(), 'started'):
    assert fragment in line, (fragment, line)
  # 3. SIGTERM while stopped, then SIGCONT: the handler runs before the loop's stop check of
  # step 1, so step 1 is saved (not a periodic save: those are every 4), and the exit is 75.
  first.send_signal(signal.SIGTERM)
  first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == preemption.EXIT_CODE, open(log[0]).read()[-3000:]
  stopped = re.findall(r'Stopped on SIGTERM: saved checkpoint (\d+)', open(log[0]).read())
  assert stopped == ['1'], open(log[0]).read()[-3000:]
  reached = 1
  assert _steps(workdir) == [reached]
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))

  # 4. The rerun resumes there and kills itself (SIGKILL) once the asynchronous save of step 8
  # is started: orbax has committed 4 (a save waits for the previous one), not 8.
  with open(log[1], 'w') as f:
    third = subprocess.Popen(_train_cmd(env, workdir, *EVERY_4),
                             env=_fault_env(env, 'save_started:8:kill'), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=f)
  reaper.append(third)
  assert third.wait(timeout=600) == -signal.SIGKILL, open(log[1]).read()[-3000:]
  assert f'Resumed from checkpoint {reached}' in open(log[1]).read()
  assert _steps(workdir) == [reached, 4], 'the save of 8 was committed before the kill'
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # left by the killed one

  # 5. The next run takes over the stale lock, resumes from 4 and ends where the unbroken run did.
  result = _run(env, _train_cmd(env, workdir, *EVERY_4))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Took over the stale lock' in result.stderr and f'pid {third.pid}' in result.stderr
  assert 'Resumed from checkpoint 4' in result.stderr
  workdirs.assert_same_checkpoint(unbroken, workdir, 8)


# ------------------------------------------------------------------------------------------
# Damaged checkpoints: train, sample and evaluate fall back by the same rule.
# ------------------------------------------------------------------------------------------


def _damage(workdir):
  """8: a truncated array file of the EMA (the item that samplers read, and the trainer too);
  6: no state metadata; 4: a truncated data-iterator file; 10: a half-written temporary
  folder. Only checkpoint 2 is intact."""
  c = os.path.join(workdir, 'checkpoints')
  arrays = glob.glob(os.path.join(c, '8', 'ema', 'ocdbt.process_0', 'd', '*'))
  biggest = max(arrays, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 3)
  os.remove(os.path.join(c, '6', 'state', '_METADATA'))
  data = glob.glob(os.path.join(c, '4', 'data', 'process_*.json'))[0]
  os.truncate(data, os.path.getsize(data) // 2)
  tmp = os.path.join(c, '10.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(c, '2', 'state'), os.path.join(tmp, 'state'))
  os.remove(os.path.join(tmp, 'state', '_METADATA'))


def _warnings(text):
  return re.findall(r'Skipping checkpoint (\d+) in \S+: (.*)', text)


def test_damaged_checkpoints_fall_back_in_sampling_and_training(env, unbroken, tmp_path, caplog):
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(unbroken, workdir)
  _damage(workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))

  # sample.py and the evaluator: read_workdir + load_ema_params, in this process.
  from diffusion_jax import trained_model  # pylint: disable=g-import-not-at-top
  with caplog.at_level('WARNING'):
    trained = trained_model.load_ema_params(trained_model.read_workdir(workdir))
  assert trained.step == 2
  skipped = _warnings('\n'.join(r.getMessage() for r in caplog.records))
  assert [int(s) for s, _ in skipped] == [8, 6, 4], skipped
  reasons = dict(skipped)
  assert '_METADATA is missing' in reasons['6']
  assert 'data/process_0-of-1.json' in reasons['4']
  assert 'OUT_OF_RANGE' in reasons['8'] or 'Error reading' in reasons['8'], reasons['8']
  want, _ = workdirs.restore_checkpoint(unbroken, 2)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want['ema'])[0],
                          jax.tree.leaves(trained.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before  # readers move nothing

  # The trainer: one warning per damaged step, moved aside (not deleted), resumes from 2.
  result = _run(env, _train_cmd(env, workdir, *EVERY_2))
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = _warnings(result.stderr)
  assert [int(s) for s, _ in skipped] == [8, 6, 4], skipped
  assert all(f'moved to {os.path.join(workdir, "set_aside_checkpoints", s)}' in r
             for s, r in skipped)
  assert 'Resumed from checkpoint 2' in result.stderr
  for s in ('8', '6', '4'):
    assert os.path.isdir(os.path.join(workdir, 'set_aside_checkpoints', s, 'state'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '10.orbax-checkpoint-tmp'))
  workdirs.assert_same_checkpoint(unbroken, workdir, 8)


def test_no_readable_checkpoint_is_one_line(env, unbroken, tmp_path):
  workdir = str(tmp_path / 'all_damaged')
  shutil.copytree(unbroken, workdir)
  for s in _steps(workdir):
    os.remove(os.path.join(workdir, 'checkpoints', str(s), 'state', '_METADATA'))
  from diffusion_jax import trained_model  # pylint: disable=g-import-not-at-top
  with pytest.raises(checkpointing.NoReadableCheckpointError, match='no readable checkpoint'):
    trained_model.read_workdir(workdir)


# ------------------------------------------------------------------------------------------
# Failed saves and unusable workdirs.
# ------------------------------------------------------------------------------------------


def _fill(directory) -> int:
  """Writes a file into `directory` until its filesystem refuses another byte (ENOSPC)."""
  written, chunk = 0, 1 << 20
  with open(os.path.join(directory, 'filler'), 'wb', buffering=0) as f:
    while chunk:
      try:
        written += f.write(b'\0' * chunk)
      except OSError as e:
        assert e.errno == errno.ENOSPC, e
        chunk //= 2
  return written


def test_full_disk_is_one_line_and_earlier_checkpoints_restore(env, unbroken, tmp_path, reaper):
  """A real full disk, at a named point: the trainer stops itself once the save of 8 is started
  (4 is committed), the test fills the tmpfs, the trainer goes on and its save fails.

  (Sizing the tmpfs to fit one checkpoint and not two was not enough: the same checkpoint's
  size on disk varies by a third between runs, and once both fitted.)"""
  disk = tmp_path / 'disk'
  disk.mkdir()
  one = sum(os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(os.path.join(unbroken, 'checkpoints', '4')) for f in files)
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={4 * one // 1024}k', 'tmpfs',
                          str(disk)], capture_output=True, text=True)
  assert mount.returncode == 0, f'this test needs root to mount a tmpfs: {mount.stderr}'
  try:
    workdir = str(disk / 'run')
    log = str(tmp_path / 'log.txt')
    with open(log, 'w') as f:
      proc = subprocess.Popen(_train_cmd(env, workdir, *EVERY_4),
                              env=_fault_env(env, 'save_started:8:stop'), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=f)
    reaper.append(proc)
    _wait_until_stopped(proc, log)
    assert _fill(disk) > 0
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, '', open(log).read())
    line = _error_line(result)
    assert 'could not write' in line and 'No space left on device' in line, line
    assert os.path.join(workdir, 'checkpoints') in line, line
    # One line says it: no traceback of orbax's or tensorstore's threads around it (they once
    # split the error line; cli._drop_closed_loop_callbacks, cli._QuietOrbax).
    assert 'Traceback' not in result.stderr, result.stderr[-4000:]
    os.remove(disk / 'filler')
    assert _steps(workdir) == [4]
    workdirs.assert_same_checkpoint(unbroken, workdir, 4)
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)


def test_workdir_under_a_regular_file(env, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  line = _error_line(_run(env, _train_cmd(env, blocker / 'run', *EVERY_4)))
  assert f'cannot create the workdir {blocker / "run"}' in line, line


def test_workdir_errors_in_process(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(workdir_lock.WorkdirError, match=re.escape(str(blocker / 'w'))):
    workdir_lock.make_workdir(blocker / 'w')
  ro = tmp_path / 'ro'
  ro.mkdir()
  os.chmod(ro, 0o500)
  if os.access(ro, os.W_OK):   # root ignores modes: inject the error the kernel would give
    from etils import epath  # pylint: disable=g-import-not-at-top
    def denied(self, *a, **k):
      raise PermissionError(13, 'Permission denied', str(self))
    monkeypatch.setattr(type(epath.Path(str(ro))), 'mkdir', denied)
    with pytest.raises(workdir_lock.WorkdirError,
                       match=f'{re.escape(str(ro / "w"))}: Permission denied'):
      workdir_lock.make_workdir(ro / 'w')
  else:
    with pytest.raises(workdir_lock.WorkdirError, match='Permission denied'):
      workdir_lock.make_workdir(ro / 'w')


# ------------------------------------------------------------------------------------------
# The lock, in this process.
# ------------------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
  lock = workdir_lock.acquire(tmp_path / 'w')
  holder = json.loads((tmp_path / 'w' / 'train.lock').read_text())
  assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=f'host {socket.gethostname()}, pid {os.getpid()}, started'):
    workdir_lock.acquire(tmp_path / 'w')
  lock.release()
  assert not (tmp_path / 'w' / 'train.lock').exists()

  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (tmp_path / 'w' / 'train.lock').write_text(json.dumps(dict(
      host=socket.gethostname(), pid=dead.pid, start_ticks=1, started='earlier', token='x')))
  with caplog.at_level('WARNING'):
    lock = workdir_lock.acquire(tmp_path / 'w')
  assert any('Took over the stale lock' in r.getMessage() and f'pid {dead.pid}' in r.getMessage()
             for r in caplog.records)
  assert json.loads((tmp_path / 'w' / 'train.lock').read_text())['pid'] == os.getpid()
  # A lock from another host is respected (its pid cannot be checked from here).
  lock.release()
  (tmp_path / 'w' / 'train.lock').write_text(json.dumps(dict(host='elsewhere', pid=dead.pid)))
  with pytest.raises(workdir_lock.WorkdirLockedError, match='another host'):
    workdir_lock.acquire(tmp_path / 'w')


# ------------------------------------------------------------------------------------------
# Signals, in this process.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_only_sets_the_flag(sig):
  before = signal.getsignal(sig)
  with preemption.watch():
    assert not preemption.should_stop(0)
    os.kill(os.getpid(), sig)
    time.sleep(0.01)   # the handler runs between bytecodes of the main thread
    assert preemption.should_stop(1)
    assert preemption.signal_received() == signal.Signals(sig).name
  assert signal.getsignal(sig) == before
  assert preemption.signal_received() is None


# ------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('section,key,value,allowed', [
    ('optimizer', 'learning_rate', -1.0, '> 0'),
    ('optimizer', 'learning_rate', 0.0, '> 0'),
    ('optimizer', 'learning_rate', float('nan'), '> 0'),
    ('optimizer', 'b2', 1.0, '[0, 1)'),
    ('optimizer', 'eps', 0.0, '> 0'),
    ('optimizer', 'grad_clip', -1.0, '>= 0'),
    ('optimizer', 'warmup_steps', -5, '>= 0'),
    ('training', 'ema_decay', 1.0, '[0, 1)'),
    ('training', 'ema_decay', -0.1, '[0, 1)'),
])
def test_bad_optimizer_and_ema_values(section, key, value, allowed):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.spec import ExperimentSpec  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config[section][key] = value
  digits = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500})
  with pytest.raises(ValueError) as info:
    ExperimentSpec.from_config(ml_collections.ConfigDict(config.to_dict()), digits)
  message = str(info.value)
  oracles.assert_one_line_error(message, f'{section}.{key}', allowed)


def test_unknown_config_key_names_the_closest(env, tmp_path):
  result = _run(env, _train_cmd(env, tmp_path, '--config.training.batchsize=8'))
  line = _error_line(result)
  assert "'training.batchsize'" in line and "closest is 'training.batch_size'" in line, line
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_non_finite_loss_sets_aside_the_states_that_produced_it(env, unbroken, tmp_path):
  workdir = str(tmp_path / 'nan')
  shutil.copytree(unbroken, workdir)
  result = _run(env, _train_cmd(
      env, workdir, '--config.training.num_train_steps=20', '--config.training.log_every_steps=1',
      '--config.training.checkpoint_every_steps=1', '--config.optimizer.learning_rate=1e30',
      '--config.optimizer.warmup_steps=0'))
  line = _error_line(result)
  bad_step = int(re.search(r'non-finite \S+.* at step (\d+)', line).group(1))
  safe = int(re.search(r'last good checkpoint \((\d+)\)', line).group(1))
  # The metrics of step s come from the state of step s - 1: it and later ones are not safe.
  assert safe <= bad_step - 2 and safe == max(_steps(workdir)), (line, _steps(workdir))
  aside = os.path.join(workdir, 'set_aside_checkpoints')
  assert sorted(int(n) for n in os.listdir(aside) if n.isdigit()) == list(
      range(safe + 1, bad_step)), os.listdir(aside)
  state, _ = workdirs.restore_checkpoint(workdir, safe)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['state']['params']))


# ------------------------------------------------------------------------------------------
# Two processes on loopback: SIGTERM reaches one of them.
# ------------------------------------------------------------------------------------------


def _two_processes(env, workdir, logs, *overrides):
  # The run's shared compilation cache: JAX writes it from process 0 only, but both processes
  # read it, so the second and third runs of a test compile nothing. A process that compiles
  # more slowly than its peer is no failure: the trainer meets its peers at a barrier between
  # compiling the step and running it (parallel.host_barrier).
  e2 = dict(env['env'], XLA_FLAGS=env['env']['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=4'))
  port = helpers.free_port()
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(
          _train_cmd(env, workdir, *overrides) + [
              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'], env=e2, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f))
  return procs


def test_two_processes_agree_on_the_preemption_step(env, tmp_path, reaper):
  # 16 steps: the runtime needs a few steps' time to agree on the stop step.
  args = ('--config.training.num_train_steps=16', '--config.training.log_every_steps=1',
          '--config.training.checkpoint_every_steps=8')
  whole, broken = str(tmp_path / 'whole'), str(tmp_path / 'broken')
  logs = [[str(tmp_path / f'{name}_{i}.txt') for i in range(2)] for name in ('w', 'b', 'r')]
  procs = _two_processes(env, whole, logs[0], *args)
  reaper.extend(procs)
  for p, log in zip(procs, logs[0]):
    assert p.wait(timeout=600) == 0, open(log).read()[-3000:]

  procs = _two_processes(env, broken, logs[1], *args)
  reaper.extend(procs)
  _wait_for_line(logs[1][0], r'step 1/16', procs[0])
  procs[1].send_signal(signal.SIGTERM)   # only process 1 is told
  saved = []
  for p, log in zip(procs, logs[1]):
    assert p.wait(timeout=600) == preemption.EXIT_CODE, open(log).read()[-3000:]
    saved.append(re.findall(r'saved checkpoint (\d+)', open(log).read()))
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  reached = int(saved[0][0])
  # Where the agreed step lands depends on how far the processes ran before the notice
  # spread (machine load): any step after the first, before the last. Step 8 is as valid as
  # any: the preemption save is then the checkpoint of 8 and the run stops there. So the
  # checkpoints are the preemption's and, when the run got past 8, the periodic one of 8;
  # nothing later.
  assert 2 <= reached < 16, reached
  assert _steps(broken) == sorted({reached} | ({8} if reached > 8 else set())), (
      _steps(broken), reached)

  procs = _two_processes(env, broken, logs[2], *args)
  reaper.extend(procs)
  for p, log in zip(procs, logs[2]):
    assert p.wait(timeout=600) == 0, open(log).read()[-3000:]
    assert f'Resumed from checkpoint {reached}' in open(log).read()
  workdirs.assert_same_checkpoint(whole, broken, 16)
