"""Named fault points for the tests: the process kills or stops itself at a chosen place.

    DIFFUSION_JAX_FAULT=<point>:<step>:<action>     e.g. save_started:8:kill

`at(point, step)` is called by the trainer at each named point; when the variable names that
point and step, the process sends itself the action's signal there. Points:
  * `after_step`: step N, a log step, finished and its progress line was logged;
  * `save_started`: the asynchronous save of checkpoint N was started (the previous save is
    committed, N is not yet);
  * `pairs_written`: reflow's chunk N of teacher pairs was written to the workdir.
Actions: `kill` (SIGKILL), `stop` (SIGSTOP: the test resumes it with SIGCONT), `term`
(SIGTERM, as a preemption notice). The step is a non-negative decimal integer (ASCII digits).

The variable is read and checked once, by `arm()`, which the trainer calls first thing
(`train.train_and_evaluate`, before any data, model or compilation): a malformed value is a
one-line ValueError there, and an armed fault logs one line there and one when it fires. When
the variable is unset, `at` costs one cached call and a comparison. Tests use it to hit a
point deterministically instead of racing the clock.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import signal
from typing import NamedTuple

from absl import logging

ENV = 'DIFFUSION_JAX_FAULT'


class Point(enum.Enum):
  AFTER_STEP = 'after_step'
  SAVE_STARTED = 'save_started'
  PAIRS_WRITTEN = 'pairs_written'


_ACTIONS = {'kill': signal.SIGKILL, 'stop': signal.SIGSTOP, 'term': signal.SIGTERM}
# ASCII digits only: str.isdigit() also accepts '²' (which int() then rejects) and '٣'.
_STEP = re.compile(r'[0-9]+')


class Fault(NamedTuple):
  point: Point
  step: int
  action: str  # a key of _ACTIONS

  @property
  def signal(self) -> signal.Signals:
    return _ACTIONS[self.action]

  def __str__(self) -> str:
    return f'{self.point.value}:{self.step}:{self.action}'


def parse(spec: str) -> Fault | None:
  """`<point>:<step>:<action>` → the Fault; '' → None; anything else → a one-line ValueError
  that names the value and the allowed form."""
  if not spec:
    return None
  parts = spec.split(':')
  if (len(parts) == 3 and parts[0] in {p.value for p in Point}
      and _STEP.fullmatch(parts[1]) and parts[2] in _ACTIONS):
    return Fault(Point(parts[0]), int(parts[1]), parts[2])
  points = '|'.join(p.value for p in Point)
  raise ValueError(f'{ENV}={spec!r} is malformed: expected <point>:<step>:<action> with point '
                   f'{points}, step a non-negative integer and action {"|".join(_ACTIONS)}, '
                   'e.g. save_started:8:kill')


@functools.cache
def _planned() -> Fault | None:
  """The fault the environment plans, parsed once (an error is not cached: it recurs)."""
  fault = parse(os.environ.get(ENV, ''))
  if fault is not None:
    logging.warning('fault armed: %s=%s: this process sends itself %s at %s step %d',
                    ENV, fault, fault.signal.name, fault.point.value, fault.step)
  return fault


def arm() -> Fault | None:
  """Reads and checks the variable (once per process) and returns the planned fault. Call it
  at start-up, before any expensive work, so that a malformed value fails there."""
  return _planned()


def at(point: Point, step: int) -> None:
  """Sends this process the planned signal if `point` at `step` is the planned fault."""
  planned = _planned()
  if planned is not None and (planned.point, planned.step) == (point, step):
    logging.warning('fault fires: %s=%s: sending %s to this process', ENV, planned,
                    planned.signal.name)
    os.kill(os.getpid(), planned.signal)
