"""host_memory.reuse_freed_host_memory: XLA:CPU's temporaries stop page-faulting every execution.

Each case runs in a fresh process (mallopt must come before XLA's threads first allocate): a
jitted program whose temporaries are 96 MiB (above glibc's 32 MiB mmap threshold) is executed
repeatedly, and the minor page faults of each execution are counted (their median is compared). Left alone, glibc maps fresh
pages for the temporaries every time (one fault per 4 KiB page); after the call it reuses them.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import json, resource, sys
from diffusion_jax.runtime import host_memory
applied = host_memory.reuse_freed_host_memory() if sys.argv[1] == 'reuse' else None
import jax, jax.numpy as jnp

@jax.jit
def f(x):  # x: [8, 1024, 1024]; y and z are temporaries, 32 MiB each
  y = jnp.cumsum(x, axis=0)
  z = jnp.cumsum(y[::-1], axis=0)
  return jnp.sum(z * y)

x = jax.random.normal(jax.random.key(int(sys.argv[2])), (8, 1024, 1024))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(2):
  f(x).block_until_ready()
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: the heap may still grow once or twice (a block freed late, after the next call
# has started), which faults in one call's worth of pages; left alone, glibc faults every call.
print(json.dumps(dict(applied=applied, temp_pages=temp / 4096,
                      faults_per_call=sorted(faults)[len(faults) // 2])))
'''


def _probe(mode: str) -> dict:
  proc = subprocess.run([sys.executable, '-c', PROBE, mode, str(os.getpid())],
                        capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt: Linux only')
@pytest.mark.slow
def test_temporaries_are_reused_instead_of_faulted_in_every_call():
  default = _probe('default')
  reused = _probe('reuse')
  assert reused['applied'] is True
  assert default['temp_pages'] >= 24 * 1024  # 96 MiB: the case the function is for
  # Left alone, every call faults in (nearly) all of its temporaries' pages ...
  assert default['faults_per_call'] > 0.75 * default['temp_pages'], default
  # ... and after the call the heap keeps them.
  assert reused['faults_per_call'] < 0.25 * reused['temp_pages'], reused
