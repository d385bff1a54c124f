"""The CLIs' shared start-up (diffusion_jax/runtime/cli.py): what a failed save leaves on stderr.

After a failed asynchronous save, tensorstore's late writes hit orbax's closed event loop and
asyncio collects orbax's failed tasks: both printed tracebacks around (and once, in CI, through)
the one `error:` line. The full-disk test in test_reliability.py checks a real run; these check
the two filters on their own, with the real mechanisms (an unraisable exception from a
finalizer, a record from asyncio's logger).
"""

import asyncio
import gc
import io
import logging
import sys

from diffusion_jax.runtime import cli


class _CallsAClosedLoop:
  """Its finalizer does what tensorstore's late callback does: call_soon_threadsafe on a
  closed loop. Python reports that through sys.unraisablehook."""

  def __init__(self, loop):
    self.loop = loop

  def __del__(self):
    self.loop.call_soon_threadsafe(print)


class _RaisesSomethingElse:
  def __del__(self):
    raise ValueError('a different failure')


def _unraisable_output(monkeypatch, make, *, filtered=True):
  stderr = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', stderr)
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)
  if filtered:
    cli._drop_closed_loop_callbacks()  # pylint: disable=protected-access
  obj = make()
  del obj
  gc.collect()
  return stderr.getvalue()


def test_closed_loop_callbacks_are_dropped_and_other_unraisables_are_not(monkeypatch):
  loop = asyncio.new_event_loop()
  loop.close()
  assert _unraisable_output(monkeypatch, lambda: _CallsAClosedLoop(loop)) == ''
  other = _unraisable_output(monkeypatch, _RaisesSomethingElse)
  assert 'ValueError: a different failure' in other, other


def test_without_the_filter_the_closed_loop_traceback_is_printed(monkeypatch):
  """The case above is a real one: unfiltered, it prints the traceback seen in CI."""
  loop = asyncio.new_event_loop()
  loop.close()
  out = _unraisable_output(monkeypatch, lambda: _CallsAClosedLoop(loop), filtered=False)
  assert 'RuntimeError: Event loop is closed' in out, out


def _asyncio_record(task_repr: str) -> logging.LogRecord:
  """What asyncio's default exception handler logs for a failed task nobody awaited."""
  return logging.LogRecord('asyncio', logging.ERROR, asyncio.base_events.__file__, 1,
                           f'Task exception was never retrieved\nfuture: {task_repr}', (), None)


def test_orbax_tasks_never_retrieved_are_dropped_and_others_kept():
  quiet = cli._QuietOrbax()  # pylint: disable=protected-access
  orbax_task = ("<Task finished name='Task-7' coro=<async_serialize_from_host() done, defined "
                "at /x/site-packages/orbax/checkpoint/_src/serialization/serialization.py:126>>")
  user_task = "<Task finished name='Task-8' coro=<mine() done, defined at /home/u/job.py:3>>"
  assert not quiet.filter(_asyncio_record(orbax_task))
  assert quiet.filter(_asyncio_record(user_task))
  # orbax's own errors stay, as one line without the traceback.
  try:
    raise OSError(28, 'No space left on device')
  except OSError:
    exc_info = sys.exc_info()
  record = logging.LogRecord('absl', logging.ERROR, '/x/orbax/checkpoint/checkpoint_manager.py',
                             1, 'Save Finalize thread failed.', (), exc_info)
  assert quiet.filter(record) and record.exc_info is None
