"""Named fault points for the tests: the process kills or stops itself at a chosen place.

    DIFFUSION_JAX_FAULT=<point>:<step>:<action>     e.g. save_started:8:kill

`at(point, step)` is called by the trainer at each named point; when the variable names that
point and step, the process sends itself the action's signal there. Points:
  * `after_step`: step N, a log step, finished and its progress line was logged;
  * `save_started`: the asynchronous save of checkpoint N was started (the previous save is
    committed, N is not yet).
Actions: `kill` (SIGKILL), `stop` (SIGSTOP: the test resumes it with SIGCONT), `term`
(SIGTERM, as a preemption notice). The variable is read once; when it is unset this costs one
comparison. Tests use it to hit a point deterministically instead of racing the clock.
"""

from __future__ import annotations

import enum
import functools
import os
import signal

ENV = 'DIFFUSION_JAX_FAULT'


class Point(enum.Enum):
  AFTER_STEP = 'after_step'
  SAVE_STARTED = 'save_started'


_ACTIONS = {'kill': signal.SIGKILL, 'stop': signal.SIGSTOP, 'term': signal.SIGTERM}


@functools.cache
def _planned() -> tuple[Point, int, signal.Signals] | None:
  spec = os.environ.get(ENV, '')
  if not spec:
    return None
  parts = spec.split(':')
  points = ', '.join(p.value for p in Point)
  if (len(parts) != 3 or parts[0] not in {p.value for p in Point} or not parts[1].isdigit()
      or parts[2] not in _ACTIONS):
    raise ValueError(f'{ENV}={spec!r} is not <point>:<step>:<action> with point one of '
                     f'{points} and action one of {", ".join(_ACTIONS)}')
  return Point(parts[0]), int(parts[1]), _ACTIONS[parts[2]]


def at(point: Point, step: int) -> None:
  """Sends this process the planned signal if `point` at `step` is the planned fault."""
  planned = _planned()
  if planned is not None and planned[:2] == (point, step):
    os.kill(os.getpid(), planned[2])
