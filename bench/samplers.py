"""Every sampler of `SamplerConfig` on a trained digits workdir, against DDPM-1000 and
DDIM-100: digits FID, precision/recall and wall time against model evaluations.

  .venv/bin/python bench/samplers.py --workdir WORKDIR --num_samples 898 --out docs/samplers.md

Writes the markdown table to `--out`, `samplers_fid.png` (FID against evaluations) and
`samplers_grid.png` (the same seeds under each sampler, one row each) next to it, and the raw
numbers to `samplers.json`. Every sampler runs through the library's own path
(`trained_model.generate` with a parsed `sampler_config.SamplerConfig`), as sample.py does. Timings
are wall-clock on this machine, compile excluded (each configuration samples one batch first);
the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from diffusion_jax.evaluation import evaluate, features
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax.storage import images as images_lib
from diffusion_jax import trained_model as tm

# (sampler, step counts, step schedule, options): the fast solvers first, the references last.
CONFIGS = [
    ('dpmpp_2m', (10, 15, 20, 25), None, {}),
    ('dpmpp_3m', (10, 15, 20, 25), None, {}),
    ('heun', (5, 10), None, {}),
    ('heun', (5, 10), None, dict(churn=5.0)),     # Karras' stochastic sampler: γ = √2 − 1
    ('euler', (25, 50), None, {}),
    ('dpmpp_2m', (20,), 'karras', {}),
    ('dpmpp_2m', (20,), 'time_uniform', {}),
    ('ode', (None,), None, {}),
    ('sde', (25, 50, 100), None, {}),
    ('pc', (100,), None, {}),
    ('ddim', (25, 100), None, {}),
    ('ddpm', (25, 50, 100), None, {}),          # ancestral, respaced
    ('ddpm', (1000,), None, {}),
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_samples', type=int, default=898)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--grid_seeds', type=int, default=10)
  parser.add_argument('--out', default='docs/samplers.md')
  parser.add_argument('--only', default='',
                      help='comma-separated KIND or KIND:STEPS: run only these configurations')
  parser.add_argument('--append', action='store_true',
                      help='add the rows to an existing samplers.json beside --out (the grid '
                      'image is left as it is)')
  parser.add_argument('--smoke', action='store_true',
                      help='one step count per sampler, 3 steps for the slow ones; for a quick check')
  args = parser.parse_args(argv)

  trained = tm.load_ema_params(args.workdir)
  data_dir = trained.spec.data.data_dir
  extractor, _ = features.digits_extractor(data_dir)
  reference = features.reference_stats(extractor, trained.spec.data.dataset, data_dir)
  rng = jax.random.key(0)
  n, batch = args.num_samples, min(args.batch_size, args.num_samples)
  batch = -(-batch // jax.device_count()) * jax.device_count()
  rows, grid_rows = [], []
  grid_labels = tm.default_labels(batch, trained.num_classes)

  only = {k for k in args.only.split(',') if k}
  out_dir = os.path.dirname(args.out) or '.'
  if args.append:
    with open(os.path.join(out_dir, 'samplers.json')) as f:
      rows = json.load(f)
  for kind, step_counts, schedule, options in CONFIGS:
    for steps in (step_counts[-1:] if args.smoke else step_counts):
      if only and kind not in only and f'{kind}:{steps}' not in only:
        continue
      if args.smoke and kind in ('ddpm', 'sde', 'pc'):
        steps = 3
      cfg = sampler_config.SamplerConfig(kind, steps=steps, step_schedule=schedule, **options)
      run = tm.make_sampler(trained, cfg)
      # The same seeds for every sampler: batch 0 of rng, which also compiles.
      grid, _, _ = tm.generate(trained, cfg, num_samples=batch, rng=rng, run=run,
                               batch_size=batch, labels=grid_labels)
      grid_rows.append(grid[:args.grid_seeds])
      t0 = time.perf_counter()
      imgs, _, nfe = tm.generate(trained, cfg, num_samples=n, rng=rng, run=run,
                                 batch_size=batch)
      seconds = time.perf_counter() - t0
      q = evaluate.sample_quality(imgs, extractor, reference)
      rows.append(dict(sampler=cfg.describe(), nfe=nfe, seconds=seconds,
                       label=kind + (f' ({schedule})' if schedule else '')
                       + ''.join(f' {k} {v:g}' for k, v in options.items()),
                       load=os.getloadavg()[0], **q))
      print(json.dumps(rows[-1]), flush=True)

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'samplers.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  lines = ['| sampler | model evaluations | digits FID | precision | recall | wall s | load |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['sampler']} | {r['nfe']} | {r['fid']:.2f} | {r['precision']:.3f} | "
                 f"{r['recall']:.3f} | {r['seconds']:.1f} | {r['load']:.1f} |")
  with open(args.out, 'w') as f:
    f.write(f'Digits, {n} samples from {args.workdir} (step {trained.step}).\n\n'
            + '\n'.join(lines) + '\n\n![FID against evaluations](samplers_fid.png)\n\n'
            '![the same seeds, one sampler per row (table order)](samplers_grid.png)\n')
  if not args.append:
    grid = images_lib.make_grid(np.concatenate(grid_rows), ncol=args.grid_seeds)
    images_lib.save_png(os.path.join(out_dir, 'samplers_grid.png'), grid, scale=4)
  _plot(rows, os.path.join(out_dir, 'samplers_fid.png'))
  print('\n'.join(lines))


def _plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  by_solver = {}
  for r in rows:
    by_solver.setdefault(r['label'], []).append((r['nfe'], r['fid']))
  for name, pts in by_solver.items():
    pts.sort()
    ax.plot(*zip(*pts), marker='o', label=name)
  ax.set_xscale('log')
  ax.set_xlabel('model evaluations')
  ax.set_ylabel('digits FID')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
