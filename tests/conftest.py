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
