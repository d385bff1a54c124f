"""Test-wide setup: eight fake CPU devices, configured before any JAX computation; the
environment of the tests that run the entry points in child processes; and `--emulate-tf32`,
which makes the CPU round matmul operands as a GPU does at the default precision."""

import os

import jax
import jax.numpy as jnp
import pytest

jax.config.update('jax_num_cpu_devices', 8)


def pytest_addoption(parser):
  parser.addoption(
      '--emulate-tf32', action='store_true',
      help='Round the float32 operands of every dot_general that does not ask for '
           'Precision.HIGHEST to TF32 (a 10-bit mantissa), as NVIDIA GPUs do at the default '
           'precision: a CPU check that a test does not rely on exact matmuls.')


def _tf32(x):
  """float32 → the nearest TF32 value (round to nearest even on the low 13 bits)."""
  if x.dtype != jnp.float32:
    return x
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  b = (b + jnp.uint32(0xFFF) + ((b >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _is_highest(precision):
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  if isinstance(precision, (tuple, list)):
    return all(_is_highest(p) for p in precision)
  return str(precision).lower() in ('highest', 'float32', 'precision.highest', '2')


def pytest_configure(config):
  if not config.getoption('--emulate-tf32'):
    return
  from jax._src.lax import lax as lax_impl  # pylint: disable=g-import-not-at-top
  exact = lax_impl.dot_general

  def dot_general(lhs, rhs, dimension_numbers, precision=None, *args, **kwargs):
    if not _is_highest(precision):
      lhs, rhs = _tf32(jnp.asarray(lhs)), _tf32(jnp.asarray(rhs))
    return exact(lhs, rhs, dimension_numbers, precision, *args, **kwargs)

  lax_impl.dot_general = dot_general
  jax.lax.dot_general = dot_general

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
  """Every test that runs an entry point in a child process (through `child_env`, directly or
  by a fixture built on it) is `slow`: `pytest -m "not slow"` is the fast tier."""
  for item in items:
    if 'child_env' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='module')
def child_env(tmp_path_factory):
  """The digits prepared in a fresh TFDS folder, and the environment for child processes:
  eight CPU devices, and a compilation cache that the module's children share."""
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('children')
  data_dir = str(base / 'tfds')
  digits.prepare_digits(data_dir)
  e = dict(os.environ)
  e.update(JAX_COMPILATION_CACHE_DIR=str(base / 'jax_cache'),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
           XLA_FLAGS='--xla_force_host_platform_device_count=8',
           PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return dict(base=base, data_dir=data_dir, env=e)


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
