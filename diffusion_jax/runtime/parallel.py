"""The device mesh shared by training, sampling and evaluation: one axis, 'data'."""

from __future__ import annotations

import jax

AXIS = 'data'


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,))


def host_barrier(name: str, timeout_s: float = 600.0) -> None:
  """Waits until every process has called `host_barrier(name)`; nothing with one process.

  A barrier in the coordination service's key-value store, with no device collective: the CPU
  (gloo) collectives give a peer only 30 s to arrive at a program's first collective, so a
  process that compiles that program much more slowly than its peers (a loaded machine, a cold
  cache on one host) fails the run. Calling this between compiling and the first execution
  makes every process arrive together.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:  # a multi-process runtime without the coordination service (e.g. TPU)
    return
  client.wait_at_barrier(f'diffusion_jax:{name}', int(timeout_s * 1000))
