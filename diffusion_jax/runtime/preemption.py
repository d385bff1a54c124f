"""Stopping a run cleanly on SIGTERM or SIGINT, at a step every process agrees on.

    restore_signals = preemption.install()
    while step < total:
        ...one step...
        if preemption.should_stop(step):
          save and wait; raise preemption.Preempted(step, ...)

One process: the handler only sets a flag; `should_stop(step)` reads it after the step, so the
step in flight finishes. A second signal of the same kind gets the default action (a second
Ctrl-C or SIGTERM ends the process at once).

Several processes (`jax.distributed.initialize` called, JAX's preemption service on, which is
the default): the distributed runtime's own SIGTERM notifier is left in place, and
`should_stop` is `multihost_utils.reached_preemption_sync_point(step)`. When any process gets
SIGTERM the runtime agrees on a step (the largest step any process has reached, plus one) and
returns True there on every process. SIGINT on one process is turned into SIGTERM for that
notifier. With the service off, every process shares its flag with the others at every step
(one small all-gather) and all stop when any has one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# Exit status of train.py after a preemption checkpoint: EX_TEMPFAIL from sysexits.h, "try
# again later". Distinct from 0 (finished), 1 (error) and 128 + n (killed by signal n).
EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Raised by the trainer after the checkpoint of `step` was written and finished."""

  def __init__(self, step: int, checkpoint_dir: str, reason: str):
    self.step, self.checkpoint_dir, self.reason = step, checkpoint_dir, reason
    super().__init__(f'{reason}: saved checkpoint {step} in {checkpoint_dir}; '
                     'run the same command again to resume from it')


class _State:
  received: int | None = None   # the first signal seen by this process
  multi: bool = False           # True while stopping is agreed across processes
  use_sync_point: bool = False  # ... through JAX's preemption service


_state = _State()


def _uses_sync_point() -> bool:
  """True when jax.distributed runs with the preemption service (it owns SIGTERM then)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager is not None


def _handler(signum, frame):
  del frame
  if _state.received == signum:   # the second one: do what the signal does by default
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    return
  if _state.received is None:
    _state.received = signum
    logging.warning('%s received: finishing the current step, then saving a checkpoint '
                    '(send it again to stop at once)', signal.Signals(signum).name)
  if _state.use_sync_point and signum == signal.SIGINT:
    signal.raise_signal(signal.SIGTERM)   # to the distributed runtime's notifier


def install() -> Callable[[], None]:
  """Installs the handlers (main thread only; elsewhere only the sync point works) and returns
  the function that puts the previous ones back."""
  _state.received = None
  _state.multi = jax.process_count() > 1
  _state.use_sync_point = _state.multi and _uses_sync_point()
  ours = [s for s in _SIGNALS if not (_state.use_sync_point and s == signal.SIGTERM)]
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for s in ours:
      previous[s] = signal.signal(s, _handler)

  def uninstall():
    for s, h in previous.items():
      signal.signal(s, h)
    _state.received = None
  return uninstall


@contextlib.contextmanager
def watch() -> Iterator[None]:
  """`install()` for the duration of the block."""
  uninstall = install()
  try:
    yield
  finally:
    uninstall()


def signal_received() -> str | None:
  """The name of the signal this process received inside `watch()`, if any."""
  return signal.Signals(_state.received).name if _state.received else None


def should_stop(step: int) -> bool:
  """Whether to save and stop after `step`. Every process must call it after every step (or
  every call of a multi-step update, with the call's index), with the same value: with several
  processes it is a collective and all of them get the same answer."""
  if not _state.multi:
    return _state.received is not None
  if _state.use_sync_point:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  flags = multihost_utils.process_allgather(np.int32(_state.received is not None))
  return bool(np.any(flags))
