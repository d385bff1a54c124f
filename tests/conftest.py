"""Test-wide setup: eight fake CPU devices, configured before any JAX computation; and the
environment of the tests that run the entry points in child processes."""

import os

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
