"""Issue 32's table: the default digits model (the teacher) at 1, 2, 4 and 20 model
evaluations with its best solver at each, beside its consistency-distilled (`cd`) and
progressively distilled (`pd`) students at 1, 2 and 4; 1,797 samples scored with the digits
metrics.

  .venv/bin/python bench/distill.py --root /tmp/distill_bench         # ≈ 45 min on 2 cores
  .venv/bin/python bench/distill.py --root /tmp/distill_bench --skip_training

Trains the teacher (`configs/digits.py`, unless `--teacher` names a trained workdir and
`--teacher_seconds` its training time), then `configs/digits_cd.py` and `configs/digits_pd.py`
from it, one after the other with train.py (wall time of the whole process: imports, data,
compilation, the teacher's loading, grids and checkpoints count). Then every sampler row
through the library's own path (`trained_model.generate`, as sample.py does): the same seed for
every row, one batch first to compile (not timed), then `--num_samples` timed. The pd student
of K steps is the checkpoint that ends its round (`configs/digits_pd.py`). Scores: digits FD,
precision and recall (k = 3) against the training split. Writes `--out` (JSON) and prints the
markdown table and the issue's targets. Run it alone: timings on 2 cores move with any load.
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

# The teacher's candidates at each evaluation count (the best FD is its row).
TEACHER = {
    1: [('ddim', 1, {})],
    2: [('ddim', 2, {}), ('ddim', 2, dict(step_schedule='trailing')), ('dpmpp_2m', 1, {}),
        ('euler', 1, {})],
    4: [('ddim', 4, {}), ('ddim', 4, dict(step_schedule='trailing')), ('dpmpp_2m', 3, {}),
        ('dpmpp_3m', 3, {}), ('euler', 3, {})],
    20: [('dpmpp_2m', 19, {}), ('ddim', 20, {}), ('dpmpp_3m', 19, {})],
}


def train(config: str, workdir: str, log: str, *overrides: str) -> float:
  """Runs train.py to the config's last step; returns its wall seconds."""
  t0 = time.perf_counter()
  with open(log, 'w') as f:
    subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}',
                    f'--workdir={workdir}', *overrides], cwd=ROOT, stdout=f,
                   stderr=subprocess.STDOUT, check=True)
  return time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/distill_bench')
  parser.add_argument('--teacher', default=None, help='a trained default digits workdir')
  parser.add_argument('--teacher_seconds', type=float, default=None)
  parser.add_argument('--num_samples', type=int, default=1797)
  parser.add_argument('--batch_size', type=int, default=512)
  parser.add_argument('--students', default='cd,pd')
  parser.add_argument('--skip_training', action='store_true')
  parser.add_argument('--cd_checkpoints', default='',
                      help='also score these cd checkpoints (comma-separated steps); with a '
                           'constant learning rate a checkpoint of step S is what a run of S '
                           'steps ends with, and its wall time is read from the workdir')
  parser.add_argument('--only_cd_checkpoints', action='store_true',
                      help='score only --cd_checkpoints, merging the rows into --out')
  parser.add_argument('--out', default='docs/distillation.json')
  args = parser.parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  times_path = os.path.join(args.root, 'training.json')
  times = {}
  if os.path.exists(times_path):
    with open(times_path) as f:
      times = json.load(f)
  teacher = args.teacher or os.path.join(args.root, 'teacher')
  if args.teacher_seconds is not None:
    times['teacher'] = dict(seconds=args.teacher_seconds, load=None)
  students = args.students.split(',')

  def save_times():
    with open(times_path, 'w') as f:
      json.dump(times, f, indent=1)

  if not args.skip_training:
    if args.teacher is None:
      times['teacher'] = dict(seconds=train('configs/digits.py', teacher,
                                            os.path.join(args.root, 'teacher.log')),
                              load=os.getloadavg()[0])
      save_times()
    for name in students:
      times[name] = dict(seconds=train(f'configs/digits_{name}.py',
                                       os.path.join(args.root, name),
                                       os.path.join(args.root, name + '.log'),
                                       f'--config.distill.teacher={teacher}'),
                         load=os.getloadavg()[0])
      print(name, 'distilled in', times[name], flush=True)
      save_times()

  rows = []
  rng = jax.random.key(0)
  cache = {}

  def score(name, workdir, step, cfg, group):
    key = (workdir, step)
    if key not in cache:
      trained = tm.load_ema_params(workdir, step=step)
      data_dir = trained.spec.data.data_dir
      extractor, _ = features.digits_extractor(data_dir)
      cache[key] = (trained, extractor,
                    features.reference_stats(extractor, trained.spec.data.dataset, data_dir))
    trained, extractor, reference = cache[key]
    n = args.num_samples
    batch = -(-min(args.batch_size, n) // jax.device_count()) * jax.device_count()
    run = tm.make_sampler(trained, cfg)
    tm.generate(trained, cfg, num_samples=batch, rng=rng, run=run, batch_size=batch)
    t0 = time.perf_counter()
    imgs, _, nfe = tm.generate(trained, cfg, num_samples=n, rng=rng, run=run, batch_size=batch)
    seconds = time.perf_counter() - t0
    q = evaluate.sample_quality(imgs, extractor, reference)
    rows.append(dict(run=name, group=group, step=trained.step, sampler=cfg.describe(), nfe=nfe,
                     seconds=seconds, load=os.getloadavg()[0], **q))
    print(json.dumps(rows[-1]), flush=True)

  if args.only_cd_checkpoints:
    with open(args.out) as f:
      previous = json.load(f)
    rows.extend(previous['rows'])
    times.update(previous['training'])
  cd_dir = os.path.join(args.root, 'cd')
  for step in [int(s) for s in args.cd_checkpoints.split(',') if s]:
    name = f'cd@{step}'
    times[name] = dict(seconds=checkpoint_seconds(cd_dir, os.path.join(args.root, 'cd.log'),
                                                  step), load=None)
    for k in (1, 2, 4):
      score(name, cd_dir, step, sampler_config.SamplerConfig('consistency', steps=k), k)
  for k, candidates in ([] if args.only_cd_checkpoints else TEACHER.items()):
    for kind, steps, options in candidates:
      score('teacher', teacher, None, sampler_config.SamplerConfig(kind, steps=steps, **options),
            k)
  if 'cd' in students and not args.only_cd_checkpoints:
    for k in (1, 2, 4):
      score('cd', os.path.join(args.root, 'cd'), None,
            sampler_config.SamplerConfig('consistency', steps=k), k)
  if 'pd' in students and not args.only_cd_checkpoints:
    from configs import digits_pd  # pylint: disable=g-import-not-at-top
    d = digits_pd.get_config().distill
    for r in range(d.start_steps.bit_length()):
      k = d.start_steps >> r
      if k in (1, 2, 4):
        score('pd', os.path.join(args.root, 'pd'), d.steps_per_round * (r + 1),
              sampler_config.SamplerConfig('ddim', steps=k, step_schedule='trailing'), k)

  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(training=times, rows=rows), f, indent=1)
  print('\n'.join(table(dict(training=times, rows=rows))))


def checkpoint_seconds(workdir: str, log: str, step: int) -> float:
  """Seconds from train.py's start to checkpoint `step` (its folder's time; the start is the
  log's first line less the imports the startup line reports)."""
  import datetime  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  with open(log) as f:
    text = f.read()
  first = re.search(r'^I\d{4} (\d\d:\d\d:\d\d\.\d+)', text, re.M).group(1)
  imports = float(re.search(r'startup: imports ([\d.]+) s', text).group(1))
  folder = os.path.join(workdir, 'checkpoints', str(step))
  day = datetime.datetime.fromtimestamp(os.path.getmtime(folder))
  start = datetime.datetime.combine(day.date(), datetime.time.fromisoformat(first))
  return (day - start).total_seconds() + imports


def best(rows, run, k):
  """The row of `run` at k evaluations with the lowest FD."""
  found = [r for r in rows if r['run'] == run and r['group'] == k]
  return min(found, key=lambda r: r['fid']) if found else None


def table(result) -> list[str]:
  rows, times = result['rows'], result['training']
  lines = ['| model (training s) | sampler | checkpoint | evaluations | FD | precision | recall | '
           'sampling s |', '|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    train_s = times.get(r['run'], {}).get('seconds')
    lines.append(f"| {r['run']} ({train_s:.0f}) | {r['sampler']} | {r['step']} | {r['nfe']} | "
                 f"{r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                 f"{r['seconds']:.1f} |")
  ref = best(rows, 'teacher', 20)
  if ref is None:
    return lines
  lines.append('')
  lines.append(f"Targets (teacher at 20 evaluations: FD {ref['fid']:.2f}):")
  for run in ['cd', 'pd'] + sorted({r['run'] for r in rows if r['run'].startswith('cd@')}):
    for k, bound in ((2, 1.5), (1, 2.5)):
      r = best(rows, run, k)
      if r:
        lines.append(f"- {run}, {k} evaluation(s): FD {r['fid']:.2f} vs {bound}× = "
                     f"{bound * ref['fid']:.2f}: {'met' if r['fid'] <= bound * ref['fid'] else 'NOT met'}")
    for k in (1, 2, 4):
      r, t = best(rows, run, k), best(rows, 'teacher', k)
      if r and t:
        lines.append(f"- {run} vs the teacher at {k}: FD {r['fid']:.2f} vs half of "
                     f"{t['fid']:.2f}: {'met' if r['fid'] <= 0.5 * t['fid'] else 'NOT met'}")
    if run in times and 'teacher' in times:
      a, b = times[run]['seconds'], times['teacher']['seconds']
      lines.append(f"- {run} distilled in {a:.0f} s vs the teacher's {b:.0f} s: "
                   f"{'met' if a <= b else 'NOT met'}")
  return lines


if __name__ == '__main__':
  main()
