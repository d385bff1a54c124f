"""Console logging for the command-line programs (train.py, sample.py, evaluate)."""

import logging as std_logging

from absl import logging


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (several lines per checkpoint); keeps its warnings."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax() -> None:
  """Installs the filter on absl's handler (call once, in main)."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
