"""Every solver of `diffusion_jax.solvers` on a trained digits workdir, against DDPM-1000 and
DDIM-100: digits FID, precision/recall and wall time against model evaluations.

  .venv/bin/python bench/samplers.py --workdir WORKDIR --num_samples 1797 --out docs/samplers.md

Writes the markdown table to `--out`, `samplers_fid.png` (FID against evaluations) and
`samplers_grid.png` (the same seeds under each solver, one row each) next to it, and the raw
numbers to `samplers.json`. Timings are wall-clock on this machine, compile excluded (each
configuration is run once on one batch first).

Written against the APIs of this branch's base (trained_model.load_ema_params,
sampling.make_denoise_fn / generate, features.digits_extractor / reference_stats,
evaluate.sample_quality); to be adapted when the sampler wiring of issue 11 lands.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import continuous, evaluate, features, images, sampling, solvers
from diffusion_jax import trained_model as tm

# (solver, step counts, schedule, options)
CONFIGS = [
    ('dpmpp_2m', (10, 15, 20, 25), 'logsnr', {}),
    ('dpmpp_3m', (10, 15, 20, 25), 'logsnr', {}),
    ('heun', (5, 10, 15), 'karras', {}),
    ('euler', (25, 50), 'karras', {}),
    ('sde', (100, 250), 'time_uniform', {}),
    ('pc', (100, 250), 'time_uniform', {}),
    ('ode', (1,), 'logsnr', {'rtol': 1e-3, 'atol': 1e-3}),
]


def _solver_run(trained: tm.TrainedModel, kind: str, steps: int, schedule: str, options):
  """`run(rng, labels [B]) -> (uint8 images, nfe)` on one device, jitted once."""
  process = continuous.VPProcess.from_diffusion(trained.diffusion)
  sched = solvers.step_schedule(process, steps, schedule)
  shape = trained.info.image_shape

  @jax.jit
  def run(params, rng, labels):
    denoise_fn = sampling.make_denoise_fn(trained.model, params,
                                          labels if trained.num_classes else None)
    den = continuous.make_denoiser(process, denoise_fn, trained.mean_type)
    k_x, k_run = jax.random.split(rng)
    x_t = jax.random.normal(k_x, (labels.shape[0],) + tuple(shape))
    out = solvers.solve(kind, den, x_t, sched, k_run, **options)
    return jnp.clip(out.x0, -1.0, 1.0), out.nfe

  def call(rng, labels):
    x, nfe = run(trained.ema_params, rng, jnp.asarray(labels))
    return sampling.to_uint8(np.asarray(x)), int(nfe)
  return call


def _generate(call, n, batch, rng, num_classes):
  labels = tm.default_labels(n, num_classes)
  out, nfes = [], []
  for i in range(-(-n // batch)):
    chunk = labels[i * batch:(i + 1) * batch]
    padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
    imgs, nfe = call(jax.random.fold_in(rng, i), padded)
    out.append(imgs[:len(chunk)])
    nfes.append(nfe)
  return np.concatenate(out), float(np.mean(nfes))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_samples', type=int, default=1797)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--grid_seeds', type=int, default=10)
  parser.add_argument('--out', default='docs/samplers.md')
  parser.add_argument('--smoke', action='store_true',
                      help='one step count per solver, no references; for a quick check')
  args = parser.parse_args(argv)

  trained = tm.load_ema_params(args.workdir)
  data_dir = trained.config.data.data_dir
  extractor, _ = features.digits_extractor(data_dir)
  reference = features.reference_stats(extractor, trained.config.data.dataset, data_dir)
  rng = jax.random.key(0)
  n, batch = args.num_samples, min(args.batch_size, args.num_samples)
  rows, grid_rows = [], []
  grid_labels = tm.default_labels(args.grid_seeds, trained.num_classes)

  def record(name, nfe, seconds, imgs):
    q = evaluate.sample_quality(imgs, extractor, reference)
    rows.append(dict(solver=name, nfe=nfe, seconds=seconds, **q))
    print(json.dumps(rows[-1]), flush=True)

  if not args.smoke:
    for kind, steps in (('ddpm', None), ('ddim', 100)):
      cfg = sampling.SamplerConfig.create(kind, steps=steps)
      run = tm.make_sampler(trained, cfg)
      tm.generate(trained, cfg, num_samples=batch, rng=rng, run=run)  # compile
      t0 = time.perf_counter()
      imgs, _ = tm.generate(trained, cfg, num_samples=n, rng=rng, run=run)
      record(f'{kind}-{steps or trained.diffusion.num_timesteps}', steps or
             trained.diffusion.num_timesteps, time.perf_counter() - t0, imgs)
      grid_rows.append(imgs[:args.grid_seeds])

  for kind, step_counts, schedule, options in CONFIGS:
    for steps in (step_counts[-1:] if args.smoke else step_counts):
      call = _solver_run(trained, kind, steps, schedule, options)
      call(rng, np.zeros(batch, np.int32))  # compile
      t0 = time.perf_counter()
      imgs, nfe = _generate(call, n, batch, rng, trained.num_classes)
      seconds = time.perf_counter() - t0
      record(f'{kind}-{steps} ({schedule})', nfe, seconds, imgs)
      # The same seeds for every solver: the grid batch uses fold_in(rng, 0) with the same labels.
      grid, _ = call(jax.random.fold_in(rng, 0), grid_labels)
      grid_rows.append(grid)

  out_dir = os.path.dirname(args.out) or '.'
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'samplers.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  lines = ['| solver | model evaluations | FID | precision | recall | wall s |',
           '|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['solver']} | {r['nfe']:.0f} | {r['fid']:.2f} | {r['precision']:.3f} | "
                 f"{r['recall']:.3f} | {r['seconds']:.1f} |")
  with open(args.out, 'w') as f:
    f.write(f'Digits, {n} samples from {args.workdir} (step {trained.step}).\n\n'
            + '\n'.join(lines) + '\n\n![FID against evaluations](samplers_fid.png)\n\n'
            '![the same seeds, one solver per row](samplers_grid.png)\n')
  grid = sampling.make_grid(np.concatenate(grid_rows), ncol=args.grid_seeds)
  images.save_png(os.path.join(out_dir, 'samplers_grid.png'), grid, scale=4)
  _plot(rows, os.path.join(out_dir, 'samplers_fid.png'))
  print('\n'.join(lines))


def _plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  by_solver = {}
  for r in rows:
    by_solver.setdefault(r['solver'].split('-')[0], []).append((r['nfe'], r['fid']))
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
