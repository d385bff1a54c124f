"""One trainer per workdir: a lock file `WORKDIR/train.lock` naming its holder.

    lock = workdir_lock.acquire(workdir)     # raises WorkdirLockedError if held
    try: ...train...
    finally: lock.release()

The file holds JSON: host, pid, the process's start time (from /proc, to tell a reused pid
apart) and when the lock was taken. A lock whose holder ran on this host and is gone is stale:
it is taken over, with one warning line. A holder on another host cannot be checked from here;
such a lock is respected, and the error says to delete the file if that process is gone.

On a local or network file system the lock is created with O_CREAT | O_EXCL, so of two
trainers starting at once exactly one gets it. On object stores (`gs://...` through
etils.epath) there is no atomic create: the lock is then written after checking that none
exists, which narrows the race between two trainers started in the same second but does not
close it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import uuid

from absl import logging
from etils import epath

from diffusion_jax.storage import paths

LOCK_NAME = 'train.lock'


class WorkdirError(OSError):
  """The workdir cannot be created or written (one line, naming the path)."""


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


def _proc_start_ticks(pid: int) -> int | None:
  """The start time of process `pid` in clock ticks since boot (Linux), else None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True   # someone else's live process
  now = _proc_start_ticks(pid)
  return start_ticks is None or now is None or now == start_ticks


def _describe(holder: dict) -> str:
  return (f'host {holder.get("host")}, pid {holder.get("pid")}, started '
          f'{holder.get("started")}')


@dataclasses.dataclass
class WorkdirLock:
  path: epath.Path
  token: str

  def release(self) -> None:
    """Removes the lock file if it is still this process's."""
    try:
      if json.loads(self.path.read_text()).get('token') == self.token:
        self.path.unlink()
    except (OSError, ValueError):
      pass


def make_workdir(workdir) -> epath.Path:
  """Creates `workdir` (and parents); raises WorkdirError naming the path when it cannot."""
  path = paths.as_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # An object store has no empty directories: there a prefix is a directory once an object
    # lies under it, so only an object of that very name is in the way.
    in_the_way = path.is_file() if paths.is_remote(path) else not path.is_dir()
    if in_the_way:
      raise NotADirectoryError(f'{path} is not a directory')
  except OSError as e:
    reason = e.strerror or str(e)
    raise WorkdirError(f'cannot create the workdir {path}: {reason}') from e
  return path


def acquire(workdir) -> WorkdirLock:
  """Takes the lock of `workdir` (created if missing) for this process."""
  path = make_workdir(workdir) / LOCK_NAME
  pid = os.getpid()
  me = dict(host=socket.gethostname(), pid=pid, start_ticks=_proc_start_ticks(pid),
            started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            token=uuid.uuid4().hex)
  text = json.dumps(me)
  for _ in range(3):
    try:
      if not paths.is_remote(path):
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, 'w') as f:
          f.write(text)
      else:
        if path.exists():
          raise FileExistsError(os.fspath(path))
        path.write_text(text)
      return WorkdirLock(path, me['token'])
    except FileExistsError:
      pass
    except OSError as e:
      raise WorkdirError(f'cannot write {path}: {e.strerror or e}') from e
    try:
      holder = json.loads(path.read_text())
    except FileNotFoundError:
      continue   # released meanwhile
    except (OSError, ValueError):
      holder = {}   # half-written by a holder that died at once, or garbage
    same_host = holder.get('host') == me['host']
    if holder and not (same_host and isinstance(holder.get('pid'), int)
                       and not _alive(holder['pid'], holder.get('start_ticks'))):
      where = '' if same_host else (f' (on another host; if that process is gone, delete '
                                    f'{path})')
      raise WorkdirLockedError(
          f'workdir {path.parent} is being trained by {_describe(holder)}{where}; '
          'use another --workdir or stop that run first')
    # Stale: move it aside atomically so that of two takers only one wins, then retry.
    aside = path.parent / f'{LOCK_NAME}.stale-{me["token"][:8]}'
    try:
      path.rename(aside)
    except OSError:
      continue
    logging.warning('Took over the stale lock of %s (%s is no longer running)',
                    path.parent, _describe(holder) if holder else 'an unreadable holder')
    try:
      aside.unlink()
    except OSError:
      pass
  raise WorkdirLockedError(f'could not take the lock {path}: it keeps changing hands')
