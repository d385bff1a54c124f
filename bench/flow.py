"""Issue 34's table: the default digits model, the digits flow (`configs/digits_flow.py`) and
its reflow (`configs/digits_reflow.py`) at 1, 2, 4, 10 and 20 model evaluations, each with
its best solver there; 1,797 samples scored with the digits metrics; and bits/dim of each on
the digits test split through the PF-ODE.

  PYTHONPATH=. .venv/bin/python bench/flow.py --root /tmp/flow_bench \
      --default /tmp/digits --default_seconds 546.5           # ≈ 60 min on 2 cores

Trains the flow, then the reflow from it, with train.py, timing each whole process, unless
`ROOT/<run>.time` holds the start and end of a run already made. Scored rows are kept in
`ROOT/rows.jsonl`, and a rerun scores only the missing ones. Every sampler row goes through the library's own path
(`trained_model.generate`, as sample.py does): the same seed for every row, one batch first
to compile (not timed). Scores: digits FD, precision and recall (k = 3) against the training
split. Writes `--out` (JSON) and prints the markdown tables and the issue's target. Run it
alone: timings on 2 cores move with any load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax

from diffusion_jax import trained_model as tm
from diffusion_jax.evaluation import evaluate, features
from diffusion_jax.sampling import config as sampler_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATIONS = (1, 2, 4, 10, 20)

# Candidates (sampler, steps, options) at each evaluation count; the best FD is the row.
# ddim counts levels (one evaluation each); on the flow its default levels are the trailing
# ones, where it is Euler in t. The others take steps + 1 evaluations (heun 2·steps + 1).
FLOW = {
    1: [('ddim', 1, {})],
    2: [('ddim', 2, {}), ('dpmpp_2m', 1, {}), ('euler', 1, {})],
    4: [('ddim', 4, {}), ('dpmpp_2m', 3, {}), ('dpmpp_3m', 3, {}), ('euler', 3, {})],
    10: [('ddim', 10, {}), ('dpmpp_2m', 9, {}), ('dpmpp_3m', 9, {})],
    20: [('ddim', 20, {}), ('dpmpp_2m', 19, {}), ('dpmpp_3m', 19, {})],
}
DEFAULT = {
    1: [('ddim', 1, {})],
    2: [('ddim', 2, {}), ('ddim', 2, dict(step_schedule='trailing')), ('dpmpp_2m', 1, {}),
        ('euler', 1, {})],
    4: [('ddim', 4, {}), ('ddim', 4, dict(step_schedule='trailing')), ('dpmpp_2m', 3, {}),
        ('dpmpp_3m', 3, {}), ('euler', 3, {})],
    10: [('ddim', 10, {}), ('ddim', 10, dict(step_schedule='trailing')), ('dpmpp_2m', 9, {}),
         ('dpmpp_3m', 9, {})],
    20: [('dpmpp_2m', 19, {}), ('ddim', 20, {}), ('dpmpp_3m', 19, {})],
}


def run_seconds(root: str, name: str, config: str, workdir: str, *overrides: str) -> float:
  """train.py's wall seconds for run `name`: from `root/name.time` (start and end, written by
  a run started by hand), else by running it now."""
  stamp = os.path.join(root, name + '.time')
  if not os.path.exists(stamp):
    t0 = time.time()
    with open(os.path.join(root, name + '.log'), 'w') as f:
      subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}',
                      f'--workdir={workdir}', *overrides], cwd=ROOT, stdout=f,
                     stderr=subprocess.STDOUT, check=True)
    with open(stamp, 'w') as f:
      f.write(f'{t0} {time.time()}\n')
  with open(stamp) as f:
    start, end = (float(v) for v in f.read().split())
  return end - start


def bits_per_dim(workdir: str, examples: int) -> dict:
  """evaluate.py's PF-ODE bits/dim on the test split (`eval.json`)."""
  subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), f'--workdir={workdir}',
                  '--num_samples=0', f'--bpd_examples={examples}', '--likelihood=ode'],
                 cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'eval.json')) as f:
    out = json.load(f)
  return {k: out[k] for k in out if k.startswith('bpd')}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/flow_bench')
  parser.add_argument('--default', default='/tmp/digits', help='a trained default workdir')
  parser.add_argument('--default_seconds', type=float, required=True)
  parser.add_argument('--num_samples', type=int, default=1797)
  parser.add_argument('--batch_size', type=int, default=600)
  parser.add_argument('--bpd_examples', type=int, default=297)
  parser.add_argument('--runs', default='default,flow,reflow',
                      help='of default, flow, reflow and flow_uniform')
  parser.add_argument('--out', default='docs/flow.json')
  args = parser.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  flow_dir, reflow_dir = (os.path.join(args.root, n) for n in ('flow', 'reflow'))
  runs = args.runs.split(',')
  times = dict(default=args.default_seconds)
  if 'flow' in runs or 'reflow' in runs:
    times['flow'] = run_seconds(args.root, 'flow', 'configs/digits_flow.py', flow_dir)
  if 'reflow' in runs:
    times['reflow'] = run_seconds(args.root, 'reflow', 'configs/digits_reflow.py', reflow_dir,
                                  f'--config.distill.teacher={flow_dir}')
  if 'flow_uniform' in runs:   # the tuning alternative: the recipe with t ~ U(t_min, t_max)
    times['flow_uniform'] = run_seconds(args.root, 'flow_uniform', 'configs/digits_flow.py',
                                        os.path.join(args.root, 'flow_uniform'),
                                        '--config.diffusion.t_density=uniform')
  workdirs = dict(default=args.default, flow=flow_dir, reflow=reflow_dir,
                  flow_uniform=os.path.join(args.root, 'flow_uniform'))
  cache = os.path.join(args.root, 'rows.jsonl')
  rows, bpd = [], {}
  if os.path.exists(cache):
    with open(cache) as f:
      for line in f:
        row = json.loads(line)
        (bpd.__setitem__(row['run'], row['bpd']) if 'bpd' in row else rows.append(row))
  done = {(r['run'], r['sampler']) for r in rows}

  def keep(row):
    with open(cache, 'a') as f:
      f.write(json.dumps(row) + '\n')
    print(json.dumps(row), flush=True)

  rng = jax.random.key(0)
  for name in runs:
    trained = tm.load_ema_params(workdirs[name])
    data_dir = trained.spec.data.data_dir
    extractor, _ = features.digits_extractor(data_dir)
    reference = features.reference_stats(extractor, trained.spec.data.dataset, data_dir)
    for k, candidates in (DEFAULT if name == 'default' else FLOW).items():
      for kind, steps, options in candidates:
        cfg = sampler_config.SamplerConfig(kind, steps=steps, **options)
        if (name, cfg.describe()) in done:
          continue
        n = args.num_samples
        batch = -(-min(args.batch_size, n) // jax.device_count()) * jax.device_count()
        run = tm.make_sampler(trained, cfg)
        tm.generate(trained, cfg, num_samples=batch, rng=rng, run=run, batch_size=batch)
        t0 = time.perf_counter()
        imgs, _, nfe = tm.generate(trained, cfg, num_samples=n, rng=rng, run=run,
                                   batch_size=batch)
        seconds = time.perf_counter() - t0
        q = evaluate.sample_quality(imgs, extractor, reference)
        rows.append(dict(run=name, group=k, step=trained.step, sampler=cfg.describe(), nfe=nfe,
                         seconds=seconds, load=os.getloadavg()[0], **q))
        keep(rows[-1])
    if args.bpd_examples and name not in bpd:
      t0 = time.perf_counter()
      bpd[name] = dict(bits_per_dim(workdirs[name], args.bpd_examples),
                       seconds=time.perf_counter() - t0)
      keep(dict(run=name, bpd=bpd[name]))
  result = dict(training=times, rows=rows, bpd=bpd)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print('\n'.join(table(result)))


def best(rows, run, k):
  """The row of `run` at k evaluations with the lowest FD."""
  found = [r for r in rows if r['run'] == run and r['group'] == k]
  return min(found, key=lambda r: r['fid']) if found else None


def table(result) -> list[str]:
  rows, times, bpd = result['rows'], result['training'], result['bpd']
  runs = [r for r in ('default', 'flow', 'flow_uniform', 'reflow')
          if any(x['run'] == r for x in rows)]
  lines = ['| model (training s) | evaluations | best sampler | FD | precision | recall |',
           '|---|---:|---|---:|---:|---:|']
  for run in runs:
    for k in EVALUATIONS:
      r = best(rows, run, k)
      if r:
        lines.append(f"| {run} ({times[run]:.0f}) | {r['nfe']} | {r['sampler']} | "
                     f"{r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
  lines += ['', '| model | PF-ODE bits/dim (test split) | ± | evaluations per example |',
            '|---|---:|---:|---:|']
  for run, b in bpd.items():
    lines.append(f"| {run} | {b['bpd_ode']:.3f} | {b['bpd_ode_stderr']:.3f} | "
                 f"{b['bpd_ode_mean_evaluations']:.0f} |")
  r, d = best(rows, 'reflow', 4), best(rows, 'default', 4)
  if r and d:
    lines += ['', f"Target: reflow at 4 evaluations FD {r['fid']:.2f} vs half the default's "
                  f"{d['fid']:.2f} = {0.5 * d['fid']:.2f}: "
                  f"{'met' if r['fid'] <= 0.5 * d['fid'] else 'NOT met'}"]
  return lines


if __name__ == '__main__':
  main()
