"""diffusion_jax.runtime.xla_flags: the opt-in GPU flags touch XLA_FLAGS only for a GPU run, keep the
user's own values, and are flags this jaxlib knows (an unknown one would kill every process)."""

import os
import subprocess
import sys

import pytest

from diffusion_jax.runtime import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_a_gpu_run_gets_the_flags():
  cpu = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert not xla_flags.set_gpu_flags(environ=cpu)
  assert cpu['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  tpu = {'JAX_PLATFORMS': 'tpu'}
  assert not xla_flags.set_gpu_flags(environ=tpu) and 'XLA_FLAGS' not in tpu
  gpu = {'JAX_PLATFORMS': 'cuda,cpu'}
  assert xla_flags.set_gpu_flags(environ=gpu)
  assert gpu['XLA_FLAGS'].split() == list(xla_flags.GPU_FLAGS)


def test_the_users_value_wins_and_nothing_is_repeated():
  env = {'JAX_PLATFORMS': 'gpu',
         'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d'}
  assert xla_flags.set_gpu_flags(environ=env)
  assert xla_flags.set_gpu_flags(environ=env)
  assert env['XLA_FLAGS'] == ('--xla_gpu_enable_latency_hiding_scheduler=false '
                              '--xla_dump_to=/tmp/d')


def test_opt_in_by_environment():
  env = {'JAX_PLATFORMS': 'cuda'}
  assert not xla_flags.set_gpu_flags_if_requested(environ=env) and 'XLA_FLAGS' not in env
  env[xla_flags.ENV] = '1'
  assert xla_flags.set_gpu_flags_if_requested(environ=env) and 'XLA_FLAGS' in env
  with pytest.raises(ValueError, match="DIFFUSION_JAX_XLA_GPU_FLAGS must be 0 or 1, got 'yes'"):
    xla_flags.set_gpu_flags_if_requested(environ={xla_flags.ENV: 'yes'})


def test_too_late_once_jax_has_started(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not xla_flags.set_gpu_flags()          # a CPU run: nothing to do, never an error
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  with pytest.raises(RuntimeError, match='before JAX starts its backends'):
    xla_flags.set_gpu_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'


@pytest.mark.slow
def test_every_proposed_flag_parses_and_leaves_the_cpu_result_alone():
  """XLA aborts on an unknown flag: start a CPU process with all of them set."""
  flags = sorted({f for group in xla_flags.GPU_LEVERS.values() for f in group})
  code = 'import jax.numpy as jnp; print(float(jnp.arange(10.0) @ jnp.arange(10.0)))'
  outs = []
  for extra in ([], flags):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(extra))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, (extra, proc.stderr[-2000:])
    outs.append(proc.stdout)
  assert outs[0] == outs[1] == '285.0\n'
