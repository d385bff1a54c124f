r"""Trains a DDPM: a thin entry point around `diffusion_jax.training.loop.train_and_evaluate`.

  python train.py --config configs/digits.py --workdir /tmp/digits
  python train.py --config configs/cifar10.py --workdir DIR --config.training.batch_size=64

Re-running the same command resumes from the latest good checkpoint in DIR/checkpoints.
SIGTERM or SIGINT: the step in flight finishes, a checkpoint of it is saved, and the program
exits with status 75 (see README, "Preemption and recovery").
Multi-host: pass --jax_distributed (jax.distributed.initialize() reads the cluster from the
environment: TPU pods, SLURM, ...) or the coordinator flags explicitly.
"""

import time

STARTED = time.time()  # training.time_budget_s counts from here: imports and compile included

# pylint: disable=g-import-not-at-top,wrong-import-position
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffusion_jax.runtime import cli

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_bool('jax_distributed', False, 'Call jax.distributed.initialize() first.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  cli.start(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.jax_distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from diffusion_jax.runtime import preemption  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import workdir_lock  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, clock_start=STARTED)
  except preemption.Preempted as e:
    logging.warning('Stopped on %s', e)
    sys.exit(preemption.EXIT_CODE)
  except (ValueError, OSError, ImportError, train.NonFiniteLossError,
          workdir_lock.WorkdirLockedError) as e:
    cli.exit_with_error(e)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_exit)
