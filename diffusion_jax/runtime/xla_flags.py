"""Opt-in XLA flags for NVIDIA GPUs, set before JAX starts its backends.

XLA reads `XLA_FLAGS` once, when the first backend starts, so the flags must be in the
environment before then. `set_gpu_flags()` appends them only when JAX is going to run on a GPU
(`JAX_PLATFORMS` names cuda/gpu/rocm, or is unset and a CUDA plugin is installed), never on a
CPU- or TPU-only run, and leaves any flag the user set alone. The programs (train.py, sample.py,
evaluate) call `set_gpu_flags_if_requested()` at start-up: it does nothing unless
`DIFFUSION_JAX_XLA_GPU_FLAGS=1`. `bench/gpu.py --xla-gpu-flags` sets them in every JAX worker.

Status: proposals, not yet measured on a GPU (issue 23 owes the measurement); none is on by
default until a GPU run shows it helps.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ENV = 'DIFFUSION_JAX_XLA_GPU_FLAGS'
# The latency-hiding scheduler orders the step so that copies and collectives overlap compute;
# on one device it mainly reorders the optimizer's and EMA's many small updates.
GPU_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',)
# The other levers of issue 23, to be measured one at a time (bench/gpu.py with XLA_FLAGS set):
# each is a flag this jaxlib parses (tests/test_xla_flags.py checks that).
GPU_LEVERS = {
    'latency_hiding': GPU_FLAGS,
    'no_triton_gemm': ('--xla_gpu_enable_triton_gemm=false',),
    'autotune_level_4': ('--xla_gpu_autotune_level=4',),
    'no_command_buffers': ('--xla_gpu_enable_command_buffer=',),
}
_GPU_PLATFORMS = ('cuda', 'gpu', 'rocm')
_CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                 'jax_rocm7_plugin')


def targets_gpu(environ=None) -> bool:
  """Whether JAX will start on a GPU in this process, decided without starting JAX."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS', environ.get('JAX_PLATFORM_NAME', ''))
  if platforms:
    return any(p.strip().lower() in _GPU_PLATFORMS for p in platforms.split(','))
  return any(importlib.util.find_spec(name) is not None for name in _CUDA_PLUGINS)


def set_gpu_flags(flags=GPU_FLAGS, environ=None) -> bool:
  """Appends `flags` to XLA_FLAGS when JAX will run on a GPU; returns whether it did.

  A flag already in XLA_FLAGS (by name) keeps the user's value. On a GPU run, raises
  RuntimeError once JAX's backends have started, when the flags could no longer take effect.
  `environ`: a dict to edit instead of this process's environment (for tests).
  """
  process = environ is None   # a dict stands in for the environment in tests
  environ = os.environ if process else environ
  if not targets_gpu(environ):
    return False
  if process and 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError('set_gpu_flags must run before JAX starts its backends (before the '
                         'first computation); XLA has already read XLA_FLAGS')
  existing = environ.get('XLA_FLAGS', '').split()
  names = {f.split('=', 1)[0] for f in existing}
  added = [f for f in flags if f.split('=', 1)[0] not in names]
  environ['XLA_FLAGS'] = ' '.join(existing + added)
  return True


def set_gpu_flags_if_requested(environ=None) -> bool:
  """`set_gpu_flags()` when DIFFUSION_JAX_XLA_GPU_FLAGS=1, else nothing; returns whether set."""
  environ = os.environ if environ is None else environ
  value = environ.get(ENV, '')
  if value not in ('', '0', '1'):
    raise ValueError(f'{ENV} must be 0 or 1, got {value!r}')
  return value == '1' and set_gpu_flags(environ=environ)
