"""Test-wide setup: eight fake CPU devices, configured before any JAX computation; the
environment of the tests that run the entry points in child processes; and `--emulate-tf32`,
which makes the CPU round the operands of matmuls and convolutions as a GPU does at the default
precision (tests/tf32.py)."""

import os
import shutil
import tempfile

import jax
import pytest

# XLA's cheapest CPU code generation for the entry points the tests run in child processes
# (train.py, sample.py, evaluate): they compile far more than they execute (a few steps each),
# and these flags halve a tiny U-Net's compile. Not in this process: its samplers run
# thousands of steps of small programs, which these flags make twice as slow. They change no
# program's meaning; what a test compares runs under the same flags on both sides, or against
# a reference with a tolerance.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0',
                      '--xla_llvm_disable_expensive_passes=true')

jax.config.update('jax_num_cpu_devices', 8)


def pytest_addoption(parser):
  parser.addoption(
      '--emulate-tf32', action='store_true',
      help='Round the float32 operands of every dot_general and conv_general_dilated that does '
           'not ask for Precision.HIGHEST to TF32 (a 10-bit mantissa), as NVIDIA GPUs do at '
           'the default precision (tests/tf32.py): a CPU check that a test does not rely on '
           'exact matmuls and convolutions.')


def pytest_configure(config):
  if not config.getoption('--emulate-tf32'):
    return
  try:
    from tests import tf32  # pylint: disable=g-import-not-at-top
  except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import tf32  # pylint: disable=g-import-not-at-top
  tf32.install()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
  """Every test that runs an entry point in a child process (through `child_env`, directly or
  by a fixture built on it) is `slow`: `pytest -m "not slow"` is the fast tier."""
  for item in items:
    if 'child_env' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)


# ------------------------------------------------------------------------------------------
# One folder for the whole run: every xdist worker and every child process shares it.
# ------------------------------------------------------------------------------------------

# The first process to import this file (pytest's controller, or the only process without
# xdist) makes the folder; the workers it starts inherit the variable.
SESSION_ENV = 'DIFFUSION_JAX_TEST_SESSION_DIR'
if not os.environ.get(SESSION_ENV):
  os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix='diffusion_jax_tests_')
  _OWNS_SESSION_DIR = True
else:
  _OWNS_SESSION_DIR = False
SESSION_DIR = os.environ[SESSION_ENV]

# Every child process of the run (the CLIs, bench/, the notebook) compiles into and reads from
# one persistent cache: a program compiled by one test is read back by the next, in any
# worker. A positive size limit makes JAX take a file lock around each read and write, so a
# reader never sees an entry half written by another process.
CHILD_CACHE = {
    'JAX_COMPILATION_CACHE_DIR': os.path.join(SESSION_DIR, 'jax_cache'),
    'JAX_COMPILATION_CACHE_MAX_SIZE': str(16 * 2**30),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
}
os.environ.update(CHILD_CACHE)
# xdist workers import JAX after the variables are set: keep their in-process compiles
# uncached too, as the in-process tests of the cache expect.
jax.config.update('jax_compilation_cache_dir', None)


def pytest_unconfigure(config):
  del config
  if _OWNS_SESSION_DIR:
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


def _child_environment(**extra) -> dict:
  e = dict(os.environ)
  flags = ' '.join(('--xla_force_host_platform_device_count=8',) + FAST_COMPILE_FLAGS)
  e.update(CHILD_CACHE, XLA_FLAGS=flags,
           PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **extra)
  return e


@pytest.fixture(scope='module')
def child_env(tmp_path_factory):
  """The digits prepared in a fresh TFDS folder, and the environment for child processes:
  eight CPU devices, and the run's shared compilation cache."""
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('children')
  data_dir = str(base / 'tfds')
  digits.prepare_digits(data_dir)
  return dict(base=base, data_dir=data_dir, env=_child_environment())


# The tiny config trained 8 steps with a checkpoint every 2 (checkpoints 2, 4, 6, 8).
TRAINED_OVERRIDES = ('--config.training.num_train_steps=8', '--config.training.log_every_steps=1',
                     '--config.training.keep_checkpoints=4',
                     '--config.training.checkpoint_every_steps=2')


def _trained_master() -> str:
  """The run's one trained tiny workdir: the first worker to ask trains it (under a file
  lock), the others wait for it and reuse it. Read-only: tests take copies."""
  import filelock  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import workdirs  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  base = os.path.join(SESSION_DIR, 'trained')
  master, done = os.path.join(base, 'workdir'), os.path.join(base, 'done')
  os.makedirs(base, exist_ok=True)
  with filelock.FileLock(os.path.join(base, 'lock')):
    if not os.path.exists(done):
      shutil.rmtree(master, ignore_errors=True)
      data_dir = os.path.join(base, 'tfds')
      digits.prepare_digits(data_dir)
      result = subprocess.run(workdirs.train_cmd(data_dir, master, *TRAINED_OVERRIDES),
                              env=_child_environment(), cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
      assert result.returncode == 0, result.stderr[-3000:]
      with open(done, 'w') as f:
        f.write('ok')
  return master


@pytest.fixture(scope='session')
def trained_master():
  return _trained_master()


@pytest.fixture
def trained_workdir(trained_master, tmp_path):
  """A private copy of the run's trained tiny workdir (see `TRAINED_OVERRIDES`)."""
  copy = str(tmp_path / 'trained')
  shutil.copytree(trained_master, copy)
  return copy


@pytest.fixture
def rng():
  """A NumPy generator of a fresh seed, printed: `TEST_SEED=<seed>` replays it
  (tests/oracles.py)."""
  import oracles  # pylint: disable=g-import-not-at-top
  return oracles.new_rng()[0]


@pytest.fixture(scope='session')
def fake_gcs_server():
  """One fake GCS server (tests/fake_gcs.py) for the session: TensorStore keeps its first
  credentials and may cache drivers with their URL, so the port must not change."""
  try:
    from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import fake_gcs  # pylint: disable=g-import-not-at-top
  server = fake_gcs.FakeGcsServer().start()
  yield server
  server.stop()


@pytest.fixture
def fake_gcs(fake_gcs_server):
  """`gs://test-bucket` served from memory by the fake server, empty at the start of each test.

  The GCS environment variables (`fake_gcs_server.env()`, also right for child processes) are
  set for the test and restored after it, and fsspec's and etils' cached filesystems cleared."""
  import sys  # pylint: disable=g-import-not-at-top
  fake_gcs_module = sys.modules[type(fake_gcs_server).__module__]
  fake_gcs_server.reset()
  deactivate = fake_gcs_module.activate(fake_gcs_server)
  yield f'gs://{fake_gcs_module.BUCKET}'
  deactivate()
