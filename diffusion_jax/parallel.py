"""The device mesh shared by training, sampling and evaluation: one axis, 'data'."""

from __future__ import annotations

import jax

AXIS = 'data'


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,))
