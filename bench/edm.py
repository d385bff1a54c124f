"""Issue 31's table: the EDM digits recipe against the default, each trained once here and
sampled at 10–40 model evaluations, 1,797 samples scored with the digits metrics.

  .venv/bin/python bench/edm.py --root /tmp/edm_bench                  # ≈ 40 min on 2 cores
  .venv/bin/python bench/edm.py --root /tmp/edm_bench --skip_training  # re-sample only

Trains `configs/digits.py` and `configs/digits_edm.py` one after the other with train.py (wall
time of the whole process: imports, data, compilation, grids and checkpoints count), then, per
workdir, each of its sampler configurations through the library's own path
(`trained_model.generate`, as sample.py does): the same seeds for every row, one batch first to
compile (not timed), then `--num_samples` timed. Scores: digits FID (FD), precision and recall
(k = 3) against the training split. Writes the rows to `--out` (JSON) and prints the
markdown table (docs/edm.md holds the measured one).
Run it alone: timings on 2 cores move with any other load (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax

from diffusion_jax.evaluation import evaluate, features
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax import trained_model as tm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (run name, config, [(sampler, steps, options)]): 10–40 model evaluations each.
RUNS = [
    ('default', 'configs/digits.py', [
        ('dpmpp_2m', 10, {}), ('dpmpp_2m', 20, {}), ('dpmpp_2m', 39, {}),
        # The VP model through its Table 1 preconditioning with EDM's samplers (Karras' ρ = 7
        # levels, Heun, deterministic and with churn).
        ('heun', 10, dict(step_schedule='karras')),
        ('heun', 18, dict(step_schedule='karras')),
        ('heun', 18, dict(step_schedule='karras', churn=10.0)),
    ]),
    ('edm', 'configs/digits_edm.py', [
        ('heun', 5, {}), ('heun', 10, {}), ('heun', 18, {}),
        ('heun', 18, dict(churn=10.0)),
        ('dpmpp_2m', 10, {}), ('dpmpp_2m', 20, {}), ('dpmpp_2m', 39, {}),
    ]),
]


def train(config: str, workdir: str, log: str) -> float:
  """Runs train.py to the config's last step; returns its wall seconds."""
  t0 = time.perf_counter()
  with open(log, 'w') as f:
    subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}',
                    f'--workdir={workdir}'], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                   check=True)
  return time.perf_counter() - t0


def _parse(item: str):
  """'heun:17:churn=10:step_schedule=karras' -> ('heun', 17, {'churn': 10.0, ...})."""
  kind, steps, *rest = item.split(':')
  options = {}
  for pair in rest:
    key, value = pair.split('=')
    options[key] = value if key == 'step_schedule' else float(value)
  return kind, int(steps), options


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/edm_bench', help='workdirs and logs go here')
  parser.add_argument('--num_samples', type=int, default=1797)
  parser.add_argument('--batch_size', type=int, default=512)
  parser.add_argument('--runs', default='default,edm')
  parser.add_argument('--skip_training', action='store_true',
                      help='sample the workdirs already in --root (training time from its json)')
  parser.add_argument('--samplers', default='',
                      help="instead of the runs' lists: KIND:STEPS[:OPTION=VALUE...], comma-separated")
  parser.add_argument('--out', default='docs/edm.json')
  args = parser.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  runs = [r for r in RUNS if r[0] in args.runs.split(',')]
  times_path = os.path.join(args.root, 'training.json')
  times = {}
  if os.path.exists(times_path):
    with open(times_path) as f:
      times = json.load(f)
  if not args.skip_training:
    for name, config, _ in runs:
      times[name] = dict(seconds=train(config, os.path.join(args.root, name),
                                       os.path.join(args.root, name + '.log')),
                         load=os.getloadavg()[0])
      print(name, 'trained in', times[name], flush=True)
      with open(times_path, 'w') as f:
        json.dump(times, f, indent=1)

  rows = []
  rng = jax.random.key(0)
  for name, _, samplers in runs:
    trained = tm.load_ema_params(os.path.join(args.root, name))
    data_dir = trained.spec.data.data_dir
    extractor, _ = features.digits_extractor(data_dir)
    reference = features.reference_stats(extractor, trained.spec.data.dataset, data_dir)
    n = args.num_samples
    batch = -(-min(args.batch_size, n) // jax.device_count()) * jax.device_count()
    if args.samplers:
      samplers = [_parse(item) for item in args.samplers.split(',')]
    for kind, steps, options in samplers:
      cfg = sampler_config.SamplerConfig(kind, steps=steps, **options)
      run = tm.make_sampler(trained, cfg)
      tm.generate(trained, cfg, num_samples=batch, rng=rng, run=run, batch_size=batch)
      t0 = time.perf_counter()
      imgs, _, nfe = tm.generate(trained, cfg, num_samples=n, rng=rng, run=run, batch_size=batch)
      seconds = time.perf_counter() - t0
      q = evaluate.sample_quality(imgs, extractor, reference)
      rows.append(dict(run=name, step=trained.step, sampler=cfg.describe(), nfe=nfe,
                       seconds=seconds, load=os.getloadavg()[0],
                       training_s=times.get(name, {}).get('seconds'), **q))
      print(json.dumps(rows[-1]), flush=True)

  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(training=times, rows=rows), f, indent=1)
  lines = ['| recipe (training s) | sampler | model evaluations | FD | precision | recall | '
           'sampling s | load |', '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    train_s = f"{r['training_s']:.0f}" if r['training_s'] else '?'
    lines.append(f"| {r['run']} ({train_s}) | {r['sampler']} | {r['nfe']} | {r['fid']:.2f} | "
                 f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.1f} | "
                 f"{r['load']:.1f} |")
  print('\n'.join(lines))
  return lines


if __name__ == '__main__':
  main()
