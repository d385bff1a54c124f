r"""Evaluates a trained workdir: a thin entry point around
`diffusion_jax.evaluation.evaluate.evaluate`.

  python evaluate.py --workdir /tmp/digits                  # bits/dim, FID, IS, P/R
  python evaluate.py --workdir /tmp/digits --likelihood ode --num_samples 0
  python evaluate.py --workdir DIR --num_samples 50000 --features inception \
      --inception_weights inception_fid.npz --sampler ddpm --steps 1000

Prints the results as JSON and merges them into WORKDIR/eval.json. The sampler flags are
`diffusion_jax/sampling/flags.py`'s, shared with sample.py; without them the workdir's
recommended sampler is used. Bad arguments: one `error: ...` line, exit 1.
"""

import json
import sys

from absl import app
from absl import flags

from diffusion_jax.runtime import cli
from diffusion_jax.sampling import flags as sampler_flags

flags.DEFINE_string('workdir', None, 'A training workdir (config.json and checkpoints/).')
flags.DEFINE_integer('num_samples', 1000, 'Samples for FID / IS / precision-recall; 0: skip.')
flags.DEFINE_integer('bpd_examples', None, 'Test examples for bits/dim; default all; 0: skip.')
flags.DEFINE_string('features', None, "'digits' or 'inception'; default: digits on the "
                    'digits dataset, else inception.')
flags.DEFINE_string('inception_weights', None, 'The FID Inception-v3 weights (.npz, '
                    'format in diffusion_jax/models/inception.py).')
flags.DEFINE_string('reference_stats', None, 'An .npz with mu and sigma of the real '
                    'data (same network); default: computed from the train split.')
sampler_flags.define_flags()  # the flags of sample.py's sampler, the same definitions
flags.DEFINE_integer('batch_size', None, 'Samples per call, a multiple of the device count.')
flags.DEFINE_integer('seed', 0, 'Random seed.')
flags.DEFINE_string('data_dir', None, "Where the dataset is; default: the workdir's spec.")
flags.DEFINE_string('likelihood', 'vlb', "'vlb': bits/dim of the variational bound; 'ode': "
                    'also through the probability-flow ODE, beside it.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def main(argv):
  cli.start(argv)
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import trained_model
  from diffusion_jax.evaluation import evaluate
  try:
    sampler, source = sampler_flags.from_flags(
        trained_model.read_workdir(FLAGS.workdir).spec.eval.sampler)
    if FLAGS.num_samples:
      print(f'sampler: {sampler.describe()} ({source})', file=sys.stderr, flush=True)
    results = evaluate.evaluate(
        FLAGS.workdir, num_samples=FLAGS.num_samples, bpd_examples=FLAGS.bpd_examples,
        features=FLAGS.features, inception_weights=FLAGS.inception_weights,
        reference_stats=FLAGS.reference_stats, sampler=sampler, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed, data_dir=FLAGS.data_dir, likelihood=FLAGS.likelihood)
  except (ValueError, FileNotFoundError) as e:
    cli.exit_with_error(e)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
