r"""A/B timing in one process: compiled variants of the same step, run in turn, medians compared.

  python bench/ab.py train --batch 8 --rounds 6 \
      eigen='{"xla_cpu_experimental_ynn_fusion_type": ""}'

Each variant is the benchmark's `train` or `forward` program compiled with its own XLA compiler
options (a JSON object; the baseline, `default`, has none). The variants run one after another,
round after round, so a change in the machine's speed falls on all of them alike; on this
shared 2-core machine timings taken in separate processes minutes apart differ by up to ±10%,
more than most of the effects measured here. Prints each variant's median and its ratio to the
default (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('what', choices=('train', 'forward'))
  parser.add_argument('variants', nargs='*', help='NAME=JSON compiler options')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_intermixed_args(argv)
  args.devices, args.micro, args.accum = 1, 1, 1
  variants = {'default': None}
  for v in args.variants:
    name, _, opts = v.partition('=')
    try:
      variants[name] = json.loads(opts)
    except json.JSONDecodeError as e:
      parser.error(f'variant {v!r}: the options must be a JSON object ({e})')
  jax_bench.host_memory.reuse_freed_host_memory()
  runner = dict(train=jax_bench.train_runner, forward=jax_bench.forward_runner)[args.what]
  runs = {}
  for name, opts in variants.items():
    args.compiler_options = opts
    _, run, _ = runner(args)
    run()
    run()
    runs[name] = run
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times['default'])
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f'{name:24s} {med:8.4f} s  x{med / base:.3f}', flush=True)


if __name__ == '__main__':
  main()
