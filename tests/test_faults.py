"""DIFFUSION_JAX_FAULT (diffusion_jax/runtime/faults.py): the parser, the log lines of an armed and of a
fired fault, and a malformed value refused at start-up, before any work."""

import os
import signal
import subprocess
import sys
import time

import pytest

from diffusion_jax.runtime import faults

try:
  from tests import oracles
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fault_env(monkeypatch):
  """Sets DIFFUSION_JAX_FAULT for the test, with the module's cached reading cleared around it."""

  def set_to(value):
    monkeypatch.setenv(faults.ENV, value)
    faults._planned.cache_clear()  # pylint: disable=protected-access

  faults._planned.cache_clear()  # pylint: disable=protected-access
  yield set_to
  faults._planned.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize('spec, point, step, sig', [
    ('save_started:8:kill', faults.Point.SAVE_STARTED, 8, signal.SIGKILL),
    ('after_step:0:stop', faults.Point.AFTER_STEP, 0, signal.SIGSTOP),
    ('after_step:120:term', faults.Point.AFTER_STEP, 120, signal.SIGTERM),
    ('save_started:007:term', faults.Point.SAVE_STARTED, 7, signal.SIGTERM),
])
def test_parses_a_good_value(spec, point, step, sig):
  fault = faults.parse(spec)
  assert (fault.point, fault.step, fault.signal) == (point, step, sig)


def test_no_value_is_no_fault():
  assert faults.parse('') is None


@pytest.mark.parametrize('spec', [
    'save_started',                    # one part
    'save_started:8',                  # two parts
    'save_started:8:kill:now',         # four parts
    ':8:kill', 'save_started::kill', 'save_started:8:',  # an empty part
    'saved:8:kill', 'SAVE_STARTED:8:kill', 'save-started:8:kill',  # not a point
    'save_started:8:KILL', 'save_started:8:sigkill', 'save_started:8:int',  # not an action
    'save_started:eight:kill', 'save_started:-1:kill', 'save_started:+8:kill',
    'save_started:8.0:kill', 'save_started:1e3:kill', 'save_started:0x8:kill',
    'save_started:²:kill', 'save_started:٣:kill', 'save_started:８:kill',  # non-ASCII digits
    'save_started: 8:kill', ' save_started:8:kill', 'save_started:8:kill ',  # spaces
    'save_started:8:kill\n', 'save_started;8;kill', 'save_started 8 kill',
])
def test_a_malformed_value_is_one_line_naming_it(spec):
  with pytest.raises(ValueError) as info:
    faults.parse(spec)
  oracles.assert_one_line_error(info.value, f'{faults.ENV}={spec!r}',
                                '<point>:<step>:<action>', 'after_step', 'save_started',
                                'kill', 'stop', 'term')


def test_arming_logs_one_line_once(fault_env, caplog):
  fault_env('after_step:4:term')
  with caplog.at_level('INFO'):
    fault = faults.arm()
    assert faults.arm() is fault  # read once
  assert (fault.point, fault.step, fault.signal) == (faults.Point.AFTER_STEP, 4, signal.SIGTERM)
  armed = [r.getMessage() for r in caplog.records if 'fault armed' in r.getMessage()]
  assert len(armed) == 1, caplog.records
  assert armed[0] == (f'fault armed: {faults.ENV}=after_step:4:term: this process sends '
                      'itself SIGTERM at after_step step 4'), armed


def test_unset_arms_nothing_and_logs_nothing(fault_env, caplog):
  fault_env('')
  with caplog.at_level('INFO'):
    assert faults.arm() is None
    faults.at(faults.Point.AFTER_STEP, 0)
  assert not [r for r in caplog.records if 'fault' in r.getMessage()], caplog.records


def test_a_malformed_value_fails_at_arm(fault_env):
  fault_env('save_started:8')
  with pytest.raises(ValueError) as info:
    faults.arm()
  oracles.assert_one_line_error(info.value, "DIFFUSION_JAX_FAULT='save_started:8'")


def test_fires_at_its_point_and_step_only_and_logs_it(fault_env, caplog, monkeypatch):
  fault_env('save_started:6:term')
  sent = []
  monkeypatch.setattr(faults.os, 'kill', lambda pid, sig: sent.append((pid, sig)))
  with caplog.at_level('INFO'):
    faults.at(faults.Point.SAVE_STARTED, 4)
    faults.at(faults.Point.AFTER_STEP, 6)
    assert not sent
    faults.at(faults.Point.SAVE_STARTED, 6)
  assert sent == [(os.getpid(), signal.SIGTERM)]
  fired = [r.getMessage() for r in caplog.records if 'fault fires' in r.getMessage()]
  assert fired == [f'fault fires: {faults.ENV}=save_started:6:term: sending SIGTERM to this '
                   'process'], fired


def test_the_trainer_refuses_a_malformed_value_before_any_work(fault_env, monkeypatch, tmp_path):
  """In process: train_and_evaluate checks the variable before it takes the workdir's lock,
  its first piece of work (then the data, the model, the compilation)."""
  from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top

  def no_work(*args, **kwargs):
    raise AssertionError('the trainer started work before checking DIFFUSION_JAX_FAULT')

  monkeypatch.setattr(train.workdir_lock, 'acquire', no_work)
  monkeypatch.setattr(train, '_train_locked', no_work)
  fault_env('after_step:4:explode')
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(tiny.get_config(), tmp_path / 'workdir')
  oracles.assert_one_line_error(info.value, "DIFFUSION_JAX_FAULT='after_step:4:explode'")
  assert not (tmp_path / 'workdir').exists()


@pytest.mark.slow
def test_train_py_fails_fast_on_a_malformed_value(tmp_path):
  """The program: exit 1 and one `error:` line, before a workdir, the data or a compilation."""
  workdir = tmp_path / 'workdir'
  cache = tmp_path / 'jax_cache'
  env = dict(os.environ, DIFFUSION_JAX_FAULT='save_started:8:kil', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache))
  start = time.time()
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'),
       f'--config={os.path.join(ROOT, "configs", "tiny.py")}', f'--workdir={workdir}',
       f'--config.data.data_dir={tmp_path / "no_data"}'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  seconds = time.time() - start
  assert result.returncode == 1, result.stderr[-3000:]
  # Before it, only the start-up's log line of the compilation cache (cli.start).
  lines = result.stderr.strip().splitlines()
  assert [l for l in lines if l.startswith('error: ')] == lines[-1:], result.stderr[-3000:]
  assert len(lines) <= 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  oracles.assert_one_line_error(lines[-1], "error: DIFFUSION_JAX_FAULT='save_started:8:kil'",
                                '<point>:<step>:<action>')
  assert not workdir.exists() and not (tmp_path / 'no_data').exists()
  assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())  # no compile
  print(f'train.py refused the value in {seconds:.1f} s')
