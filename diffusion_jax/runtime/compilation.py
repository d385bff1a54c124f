"""Compiling once: the persistent compilation cache, and what each compiled program cost.

The entry points (train.py, sample.py, `python evaluate.py`) call
`enable_cache()` first; in a notebook or your own script, call it once before the first
JAX computation:

    from diffusion_jax.runtime import compilation
    compilation.enable_cache()            # the default folder (below); returns it, or None

Where the cache lives (one rule): the folder given, else `$JAX_COMPILATION_CACHE_DIR` when
set, else a per-user folder, `$XDG_CACHE_HOME/diffusion_jax/xla` (`~/.cache/diffusion_jax/xla`
without XDG_CACHE_HOME). A workdir is never used for it, so a `gs://` workdir never gets one
unless you pass a `gs://` folder yourself. Turn it off with `--nocompilation_cache` on the
command line, or `DIFFUSION_JAX_COMPILATION_CACHE=0` in the environment; clear it by deleting
the folder.

Several processes: every process reads the cache, and JAX writes it from process 0 only, so
hosts that share the folder (NFS, a bucket) all hit after the first run; a host with a folder
of its own compiles as before, and is no slower for it. A folder that cannot be written costs
one warning line and the run goes on without the cache; so does an entry that cannot be read
or written later (a full disk, a damaged file): JAX compiles instead, and the first such
failure is one warning line.

`track(name)` measures what compiling cost inside a block (tracing, lowering to StableHLO, the
XLA compile or the cache read) and whether the persistent cache hit, from JAX's own monitoring
events; `CompileReport.line()` is the log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import uuid
import warnings

from absl import logging
from etils import epath

ENV_DIR = 'JAX_COMPILATION_CACHE_DIR'
ENV_SWITCH = 'DIFFUSION_JAX_COMPILATION_CACHE'
# Programs that compile faster than this are not written (JAX's default is 1 s, which on a
# CPU leaves out the small programs that, together, cost seconds at every start).
DEFAULT_MIN_COMPILE_SECONDS = 0.0

_CACHE_ERROR_PREFIXES = ('Error reading persistent compilation cache',
                         'Error writing persistent compilation cache')


def default_cache_dir() -> str:
  """`$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/diffusion_jax/xla`, else
  `~/.cache/diffusion_jax/xla`."""
  if os.environ.get(ENV_DIR):
    return os.environ[ENV_DIR]
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'diffusion_jax', 'xla')


def cache_enabled_by_environment() -> bool:
  """False when `DIFFUSION_JAX_COMPILATION_CACHE` is 0, false, no or off."""
  return os.environ.get(ENV_SWITCH, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _check_writable(path: epath.Path) -> None:
  """Raises OSError unless a file can be created and removed in `path` (made if missing)."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f'.write-probe-{uuid.uuid4().hex}'
  probe.write_bytes(b'')
  probe.unlink()


class _OneWarning:
  """Shows the first warning of JAX's cache read/write errors as one line, and drops the
  rest (a full disk would otherwise give one per program)."""

  def __init__(self, cache_dir: str):
    self._cache_dir = cache_dir
    self._shown = False
    self._lock = threading.Lock()
    self._previous = warnings.showwarning

  def __call__(self, message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if not text.startswith(_CACHE_ERROR_PREFIXES):
      return self._previous(message, category, filename, lineno, file, line)
    with self._lock:
      if self._shown:
        return None
      self._shown = True
    logging.warning('compilation cache %s: %s; compiling instead (further cache errors are '
                    'not shown)', self._cache_dir, ' '.join(text.split())[:300])
    return None


_installed: _OneWarning | None = None


def enable_cache(cache_dir: str | os.PathLike[str] | None = None, *,
                 min_compile_seconds: float = DEFAULT_MIN_COMPILE_SECONDS) -> str | None:
  """Turns JAX's persistent compilation cache on; returns its folder, or None when it is off.

  Call it before the first compilation. `cache_dir` None follows the rule of the module
  docstring (and `DIFFUSION_JAX_COMPILATION_CACHE=0` turns it off). A folder that cannot be
  created or written is one warning line, and the cache stays off. Programs compiled in less
  than `min_compile_seconds` are not written.
  """
  global _installed
  import jax  # pylint: disable=g-import-not-at-top
  if cache_dir is None and not cache_enabled_by_environment():
    logging.info('compilation cache: off (%s=%s)', ENV_SWITCH, os.environ.get(ENV_SWITCH))
    return None
  folder = str(cache_dir) if cache_dir is not None else default_cache_dir()
  try:
    _check_writable(epath.Path(folder))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('compilation cache: cannot write to %s (%s); compiling without it',
                    folder, ' '.join(str(e).split())[:200] or type(e).__name__)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_seconds))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  if _installed is None:
    _installed = _OneWarning(folder)
    warnings.showwarning = _installed
  logging.info('compilation cache: %s', folder)
  return folder


def disable_cache() -> None:
  """Turns the persistent cache off for the rest of the process."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)


# ------------------------------------------------------------------------------------------
# What compiling cost.
# ------------------------------------------------------------------------------------------

_TRACE = '/jax/core/compile/jaxpr_trace_duration'
_LOWER = '/jax/core/compile/jaxpr_to_mlir_module_duration'
_COMPILE = '/jax/core/compile/backend_compile_duration'   # an XLA compile, or a cache read
_USES_CACHE = '/jax/compilation_cache/compile_requests_use_cache'
_HIT = '/jax/compilation_cache/cache_hits'


@dataclasses.dataclass
class CompileReport:
  """What the programs compiled inside one `track` block cost (seconds) and the cache."""
  name: str
  programs: int = 0            # XLA compilations or cache reads
  trace_seconds: float = 0.0
  lower_seconds: float = 0.0
  compile_seconds: float = 0.0  # XLA, or reading the persistent cache
  cache_lookups: int = 0
  cache_hits: int = 0
  wall_seconds: float = 0.0    # the whole block
  cache_on: bool = False       # a persistent cache folder was set for the block

  @property
  def total_seconds(self) -> float:
    """Tracing, lowering and compiling together."""
    return self.trace_seconds + self.lower_seconds + self.compile_seconds

  @property
  def cache(self) -> str:
    """'hit', 'miss', 'partial (k/n hits)', 'off', or 'none' (nothing compiled)."""
    if not self.programs:
      return 'none'
    if not self.cache_on or not self.cache_lookups:
      return 'off'
    if self.cache_hits == self.cache_lookups:
      return 'hit'
    if not self.cache_hits:
      return 'miss'
    return f'partial ({self.cache_hits}/{self.cache_lookups} hits)'

  def line(self) -> str:
    """'compiled train_step: 18.2 s (trace 0.9, lower 0.4, XLA 16.9; 3 programs), cache miss'."""
    if not self.programs:
      return f'compiled {self.name}: nothing to compile (already compiled in this process)'
    return (f'compiled {self.name}: {self.total_seconds:.1f} s (trace {self.trace_seconds:.1f}, '
            f'lower {self.lower_seconds:.1f}, XLA or cache read {self.compile_seconds:.1f}; '
            f'{self.programs} program{"s" if self.programs != 1 else ""}), cache '
            f'{self.cache}')

  def scalars(self, prefix: str = 'compile') -> dict[str, float]:
    """For TensorBoard or eval.json: seconds, programs and cache hits of this block."""
    return {f'{prefix}/{self.name}_seconds': self.total_seconds,
            f'{prefix}/{self.name}_programs': float(self.programs),
            f'{prefix}/{self.name}_cache_hits': float(self.cache_hits)}


_lock = threading.Lock()
_active: list[CompileReport] = []


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  with _lock:
    for report in _active:
      if event == _TRACE:
        report.trace_seconds += duration
      elif event == _LOWER:
        report.lower_seconds += duration
      elif event == _COMPILE:
        report.compile_seconds += duration
        report.programs += 1


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  with _lock:
    for report in _active:
      if event == _USES_CACHE:
        report.cache_lookups += 1
      elif event == _HIT:
        report.cache_hits += 1


_listening = False


def _listen() -> None:
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


@contextlib.contextmanager
def track(name: str, *, log: bool = True):
  """Counts the compilations inside the block: `with track('sampler') as report: ...`.

  Every compilation of the process during the block is counted (blocks may nest); `report`
  is filled when the block ends and, with `log`, its `line()` is logged.
  """
  import time  # pylint: disable=g-import-not-at-top
  _listen()
  import jax  # pylint: disable=g-import-not-at-top
  report = CompileReport(name, cache_on=bool(jax.config.jax_enable_compilation_cache and
                                             jax.config.jax_compilation_cache_dir))
  with _lock:
    _active.append(report)
  start = time.perf_counter()
  try:
    yield report
  finally:
    report.wall_seconds = time.perf_counter() - start
    with _lock:
      _active.remove(report)
    if log:
      logging.info('%s', report.line())
