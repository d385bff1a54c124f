"""What the command-line programs (train.py, sample.py, evaluate) share: start-up and errors."""

import difflib
import logging as std_logging
import runpy
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging

from diffusion_jax.runtime import host_memory
from diffusion_jax.runtime import xla_flags

flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in a persistent cache '
                  '(--nocompilation_cache: off; DIFFUSION_JAX_COMPILATION_CACHE=0 too).')
flags.DEFINE_string('compilation_cache_dir', None, 'The cache folder; default '
                    '$JAX_COMPILATION_CACHE_DIR, else ~/.cache/diffusion_jax/xla '
                    '($XDG_CACHE_HOME/diffusion_jax/xla).')


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (several lines per checkpoint); keeps its warnings, and its
  errors as one line each: a failed save is reported whole, once, by the program's `error:`
  line (checkpointing.save_or_raise), so the tracebacks of its background threads go."""

  def filter(self, record):
    if (record.name == 'asyncio' and isinstance(record.msg, str)
        and 'exception was never retrieved' in record.msg):
      # The tasks of a failed save that orbax left behind, collected after the `error:` line.
      return '/orbax/' not in record.getMessage()
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno >= std_logging.ERROR and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
  """A tensorstore write that finished after orbax had closed its event loop (the loop of a
  save that already failed) calls `loop.call_soon_threadsafe` on it: "Event loop is closed"."""
  if exc_type is not RuntimeError or str(exc) != 'Event loop is closed':
    return False
  while tb is not None:
    code = tb.tb_frame.f_code
    if code.co_name == 'call_soon_threadsafe' and 'asyncio' in code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _drop_closed_loop_callbacks() -> None:
  """After a failed asynchronous save, tensorstore's pending writes report back to orbax's
  closed event loop; C++ hands each RuntimeError to `sys.unraisablehook`, from its own
  threads: dozens of tracebacks, interleaved with (and sometimes splitting) the one `error:`
  line that already says what failed. Those, and only those, are dropped."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if _is_closed_loop_callback(unraisable.exc_type, unraisable.exc_value,
                                unraisable.exc_traceback):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def start(argv: list[str]) -> None:
  """First thing in a program's main: rejects stray arguments, makes glibc reuse the memory XLA
  frees (before XLA's first allocation; see host_memory), sets the opt-in GPU flags
  (DIFFUSION_JAX_XLA_GPU_FLAGS=1; see xla_flags), quiets orbax's INFO logging, and turns on
  the persistent compilation cache (compilation.py) unless told not to."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  host_memory.reuse_freed_host_memory()
  xla_flags.set_gpu_flags_if_requested()
  logging.get_absl_handler().addFilter(_QuietOrbax())
  _drop_closed_loop_callbacks()
  from diffusion_jax.runtime import compilation  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.compilation_cache:
    compilation.enable_cache(flags.FLAGS.compilation_cache_dir)
  else:
    compilation.disable_cache()  # also when JAX_COMPILATION_CACHE_DIR is set
    logging.info('compilation cache: off (--nocompilation_cache)')


def exit_with_error(error: Exception) -> NoReturn:
  """Prints `error` to stderr as one line, `error: ...`, and exits with status 1. (Not also
  through absl's logging: that writes to stderr too, and the message would appear twice.)"""
  print('error: ' + ' '.join(str(error).split()), file=sys.stderr)
  sys.exit(1)


def _config_file(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flat_keys(tree, prefix='') -> list[str]:
  keys = []
  for k, v in tree.items():
    keys.append(prefix + k)
    if isinstance(v, dict):
      keys += _flat_keys(v, prefix + k + '.')
  return keys


def unknown_config_key(argv: list[str]) -> str | None:
  """'unknown config key X; the closest is Y' for the first `--config.X=...` override that the
  config file does not have; None when every override names a key (or the file won't load)."""
  path = _config_file(argv)
  try:
    keys = _flat_keys(runpy.run_path(path)['get_config']().to_dict())
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
        return (f'unknown config key {key!r} (in {arg}); the closest is {close[0]!r}'
                if close else f'unknown config key {key!r} (in {arg})')
  return None


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(flags_parser=...)`; an override of a config key that does
  not exist (ml_collections raises a KeyError/AttributeError traceback) is one error line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    message = unknown_config_key(argv) or ' '.join(str(e).split())
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)
