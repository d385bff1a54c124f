"""What the command-line programs (train.py, sample.py, evaluate) share: start-up and errors."""

import logging as std_logging
import sys
from typing import NoReturn

from absl import app
from absl import logging

from diffusion_jax import host_memory


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (several lines per checkpoint); keeps its warnings."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def start(argv: list[str]) -> None:
  """First thing in a program's main: rejects stray arguments, makes glibc reuse the memory XLA
  frees (before XLA's first allocation; see host_memory), and quiets orbax's INFO logging."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  host_memory.reuse_freed_host_memory()
  logging.get_absl_handler().addFilter(_QuietOrbax())


def exit_with_error(error: Exception) -> NoReturn:
  """Prints `error` to stderr as one line, `error: ...`, and exits with status 1. (Not also
  through absl's logging: that writes to stderr too, and the message would appear twice.)"""
  print('error: ' + ' '.join(str(error).split()), file=sys.stderr)
  sys.exit(1)
