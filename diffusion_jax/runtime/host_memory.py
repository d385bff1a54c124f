"""Host memory for XLA:CPU: keep the memory a step frees for the next step.

XLA:CPU allocates a compiled program's temporaries as one block per execution and frees it when
the execution ends: 706 MB for the CIFAR-10 U-Net's train step at batch 8. glibc's malloc serves
any block above 32 MB with a fresh `mmap` and returns it with `munmap`, and always does so for
the threads that run XLA's programs (they allocate from their own arenas, which cannot grow past
64 MB). Every step then page-faults on every page of its temporaries and the kernel zeroes them:
178,000 faults and 0.36 of the 4.25 CPU-seconds of that step on this project's 2-core machine,
and a step 12% slower than it need be (docs/benchmarks.md).

`reuse_freed_host_memory()` tells glibc to serve every thread from the one main heap, never to
use `mmap` for a block, and never to give freed memory back to the system (mallopt(3):
`M_ARENA_MAX` 1, `M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` -1), so the next step reuses the last
step's pages. The cost: the process keeps its peak resident memory until it exits. It matters
only where XLA runs on the CPU; on a GPU or TPU host the device's allocator holds the
temporaries. The same can be set from outside, before a process starts, with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`.

It must run before the threads that run XLA programs first allocate: before the first JAX
operation of the process (importing jax is fine). The entry points (`train.py`, `sample.py`,
`python evaluate.py`) call it first thing, through `cli.start`.
"""

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim the heap (mallopt(3))


def reuse_freed_host_memory() -> bool:
  """Makes glibc keep and reuse freed memory; True if it applied (Linux with glibc), else False."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (musl has no mallopt).
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER)))
