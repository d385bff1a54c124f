"""Time to quality on the embedded digits: `configs/digits.py` against the PyTorch peer recipe
(diffusers' UNet2DModel + DDPMScheduler, `bench/torch_quality.py`), trained for the same
wall-clock budgets on the same 1,500 training digits, sampled with every sampler each side
offers, scored with the same digits metrics.

  .venv/bin/python bench/quality.py                      # 2, 5 and 10 minutes; ≈ 1.5 h
  .venv/bin/python bench/quality.py --budgets 5 --sides jax --set training.batch_size=128

Writes `--out` (a markdown report) and the raw rows beside it as `quality.json`. In order, the
two sides alternating, one process at a time (run it on an idle machine; the load average is
recorded with every row):
  1. Training. The peer trains once for the largest budget and saves its EMA weights as the
     clock passes each smaller one: its learning rate is constant, so that snapshot is what a
     run of that budget would have ended with. Ours runs `train.py` on the config as it is
     (sample grids and checkpoints included) once per budget with `training.time_budget_s`:
     it stops at the budget or at the config's last step, whichever comes first. Both clocks
     start with the process: imports, data and compilation count.
  2. Sampling, per budget: the peer's DDIM-100 and DPM-Solver++ 2M-20, then our samplers
     (`--samplers`), `--num` images each; at the largest budget also both sides' 1,000-step
     ancestral references on `--ref_num` images. Our sampling seconds include compilation.
  3. Scoring: digits FID, IS, precision/recall against the training split, and a no-copying
     check: the median distance from each sample to its nearest training digit over the same
     for the 297 test digits (≈ 1 when nothing is copied; memorised samples drive it to 0), and
     the share of samples nearer to a training digit than 99% of the test digits are.
  4. `--speed`: the same solver on both sides with the same U-Net (the peer's layout, random
     weights), same batch: images/s of the sampling loop, compile excluded.
`--smoke` shrinks everything to seconds (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from diffusion_jax.evaluation import evaluate, features
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax import trained_model as tm
from diffusion_jax.data import datasets, input_pipeline

PEER = os.path.join(HERE, 'torch_quality.py')
PEER_SAMPLERS = 'ddim:100,dpm:20'
OURS_SAMPLERS = 'sde:100,heun:10:churn=5,dpmpp_2m:20,ddim:100'
REFERENCE = ('ddpm', 1000)   # both sides, at the largest budget only


def parse_samplers(text: str) -> list[sampler_config.SamplerConfig]:
  """'sde:100,heun:10:churn=5' → SamplerConfigs (KIND:STEPS[:OPTION=VALUE...])."""
  out = []
  for item in filter(None, text.split(',')):
    kind, steps, *options = item.split(':')
    kwargs = {k: float(v) for k, v in (o.split('=') for o in options)}
    out.append(sampler_config.SamplerConfig(kind, steps=int(steps), **kwargs))
  return out


def load() -> float:
  return os.getloadavg()[0]


def run_json(cmd: list[str], log_path: str) -> dict:
  """Runs `cmd`, its output to `log_path`; returns its last JSON line (raises on failure)."""
  with open(log_path, 'w') as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  text = open(log_path).read()
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd[:3])} ... failed (rc {proc.returncode}):\n{text[-3000:]}')
  lines = [l for l in text.splitlines() if l.startswith('{')]
  return json.loads(lines[-1]) if lines else {}


# ------------------------------------------------------------------------------------------
# Scoring.
# ------------------------------------------------------------------------------------------


def nearest_distances(x: np.ndarray, train: np.ndarray) -> np.ndarray:
  """Euclidean distance `[N]` from each uint8 image of x to its nearest training image."""
  a = x.reshape(len(x), -1).astype(np.float64)
  b = train.reshape(len(train), -1).astype(np.float64)
  d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
  return np.sqrt(np.maximum(d2.min(1), 0.0))


def copy_check(sample_distances: np.ndarray, test_distances: np.ndarray) -> dict[str, float]:
  """`nn_ratio`: median nearest-training-digit distance of the samples over that of the
  held-out test digits (≈ 1 when nothing is copied, 0 when everything is); `copies`: the share
  of samples nearer to a training digit than 99% of the test digits are (≈ 0.01 when nothing
  is copied)."""
  return dict(nn_ratio=float(np.median(sample_distances) / np.median(test_distances)),
              copies=float(np.mean(sample_distances < np.percentile(test_distances, 1))))


class Scorer:

  def __init__(self, data_dir):
    self.extractor, _ = features.digits_extractor(data_dir)
    self.reference = features.reference_stats(self.extractor, 'digits', data_dir)
    self.train, _ = input_pipeline.load_split('digits', data_dir, 'train')
    test, _ = input_pipeline.load_split('digits', data_dir, 'test')
    self.test_distances = nearest_distances(test, self.train)

  def __call__(self, images: np.ndarray, small_n: int) -> dict:
    """The metrics of `images`, and `fid_small`: FID of the first `small_n` of them (FID is
    biased upwards at small N; this one compares with the references, sampled at that N)."""
    q = evaluate.sample_quality(images, self.extractor, self.reference)
    q['fid_small'] = (q['fid'] if len(images) <= small_n else evaluate.sample_quality(
        images[:small_n], self.extractor, self.reference)['fid'])
    q.update(copy_check(nearest_distances(images, self.train), self.test_distances))
    return q


# ------------------------------------------------------------------------------------------
# The two sides.
# ------------------------------------------------------------------------------------------


def train_peer(args, torch_py, budgets_s, root) -> dict[float, dict]:
  out = os.path.join(root, 'peer')
  cmd = [torch_py, PEER, 'train', '--data', os.path.join(root, 'train.npz'), '--out', out,
         '--budget_s', str(max(budgets_s)),
         '--snapshots', ','.join(str(b) for b in budgets_s)]
  if args.smoke:
    cmd += ['--batch', '16']
  load0, t0 = load(), time.time()
  r = run_json(cmd, os.path.join(root, 'peer_train.log'))
  wall = time.time() - t0
  return {s['budget_s']: dict(side='peer', budget_s=s['budget_s'], steps=s['step'],
                              train_s=s['seconds'], process_s=wall, weights=s['path'],
                              num_params=r['num_params'], load=load0) for s in r['snapshots']}


def train_ours(args, budget_s, root) -> dict:
  workdir = os.path.join(root, f'ours_{budget_s:g}')
  if os.path.exists(workdir):
    raise FileExistsError(f'{workdir} exists: pass a fresh --root')
  # The config as it is (its sample grids and checkpoints included), stopped by the clock if
  # it has not finished by then.
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--config', args.config,
         '--workdir', workdir, f'--config.training.time_budget_s={budget_s}']
  if args.data_dir:
    cmd.append(f'--config.data.data_dir={args.data_dir}')
  cmd += [f'--config.{kv}' for kv in args.set]
  load0, t0 = load(), time.time()
  run_json(cmd, workdir + '.log')
  wall = time.time() - t0
  info = tm.read_workdir(workdir)
  log = open(workdir + '.log').read()
  spent = [l for l in log.splitlines() if 'Time budget of' in l]
  train_s = float(spent[-1].split('(')[1].split(' s since')[0]) if spent else wall
  return dict(side='ours', budget_s=budget_s, steps=info.step, train_s=train_s,
              process_s=wall, workdir=workdir, load=load0)


def sample_peer(args, torch_py, run, sampler, steps, num, root) -> tuple[np.ndarray, dict]:
  out = os.path.join(root, f'peer_{run["budget_s"]:g}_{sampler}{steps}.npz')
  cmd = [torch_py, PEER, 'sample', '--weights', run['weights'], '--sampler', sampler,
         '--steps', str(steps), '--num', str(num), '--seed', str(args.seed), '--out', out]
  load0, t0 = load(), time.time()
  r = run_json(cmd, out + '.log')
  name = {'ddpm': 'DDPM', 'ddim': 'DDIM', 'dpm': 'DPM-Solver++ 2M'}[sampler]
  return np.load(out)['images'], dict(sampler=f'{name}-{steps}', evaluations=r['evaluations'],
                                      sample_s=r['seconds'], process_s=time.time() - t0,
                                      load=load0)


def sample_ours(args, run, cfg: sampler_config.SamplerConfig, num) -> tuple[np.ndarray, dict]:
  load0, t0 = load(), time.time()
  trained = tm.load_ema_params(run['workdir'])
  batches = -(-num // 256)   # equal batches of at most 256: little padding in the last one
  batch = -(-num // batches)
  batch = -(-batch // jax.device_count()) * jax.device_count()
  images, _, nfe = tm.generate(trained, cfg, num_samples=num, rng=jax.random.key(args.seed),
                               batch_size=batch)
  return images, dict(sampler=cfg.describe(), evaluations=int(nfe),
                      sample_s=time.time() - t0, load=load0)


# ------------------------------------------------------------------------------------------
# Sampling speed, same U-Net on both sides.
# ------------------------------------------------------------------------------------------


def speed(args, torch_py, root) -> list[dict]:
  """images/s of the sampling loop: the peer's U-Net layout on both sides, random weights."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 64, (1, 2), 2
  config.model.attn_resolutions, config.model.dropout = (4,), 0.0
  spec = spec_lib.ExperimentSpec.from_config(config, input_pipeline.dataset_info(
      'digits', args.data_dir))
  # Jitted: one program, where op by op every initializer would compile on its own.
  params = jax.jit(spec.init_params)(jax.random.key(0))
  trained = tm.TrainedModel.from_spec(spec, params, jax.sharding.Mesh(jax.devices(), ('data',)))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  batch = 16 if args.smoke else 128
  rows = []
  pairs = [('ddpm', 'ddpm', 100), ('ddim', 'ddim', 100), ('dpmpp_2m', 'dpm', 20)]
  for ours_kind, peer_kind, steps in pairs:
    steps = 2 if args.smoke else steps
    out = os.path.join(root, f'speed_{peer_kind}.npz')
    r = run_json([torch_py, PEER, 'sample', '--weights', 'random', '--sampler', peer_kind,
                  '--steps', str(steps), '--num', str(2 * batch), '--batch', str(batch),
                  '--out', out], out + '.log')
    rows.append(dict(side='peer', sampler=peer_kind, steps=steps, batch=batch,
                     images_per_s=r['images_per_s_steady'], num_params=r['num_params'],
                     load=load()))
    cfg = sampler_config.SamplerConfig(ours_kind, steps=steps)
    run = tm.make_sampler(trained, cfg)
    tm.generate(trained, cfg, num_samples=batch, rng=jax.random.key(0), run=run,
                batch_size=batch)  # compiles
    t0 = time.perf_counter()
    tm.generate(trained, cfg, num_samples=batch, rng=jax.random.key(1), run=run,
                batch_size=batch)
    rows.append(dict(side='ours', sampler=ours_kind, steps=steps, batch=batch,
                     images_per_s=batch / (time.perf_counter() - t0), num_params=num_params,
                     load=load()))
    print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
  return rows


# ------------------------------------------------------------------------------------------
# The run and the report.
# ------------------------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--budgets', default='2,5,10', help='training minutes, comma-separated')
  parser.add_argument('--sides', default='peer,ours')
  parser.add_argument('--samplers', default=OURS_SAMPLERS,
                      help='ours: KIND:STEPS[:OPTION=VALUE], comma-separated')
  parser.add_argument('--peer_samplers', default=PEER_SAMPLERS,
                      help='the peer: ddpm|ddim|dpm:STEPS, comma-separated')
  parser.add_argument('--num', type=int, default=1797, help='samples per sampler')
  parser.add_argument('--ref_num', type=int, default=449,
                      help='samples of each 1,000-step reference (0: none)')
  parser.add_argument('--config', default='configs/digits.py')
  parser.add_argument('--set', action='append', default=[],
                      help='KEY=VALUE: a config override for our side (repeatable)')
  parser.add_argument('--speed', action='store_true', help='also the sampling-speed table')
  parser.add_argument('--root', default='/tmp/diffusion_jax_quality',
                      help='where workdirs, weights and samples go (must not exist)')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--torch_python', default=None,
                      help='a Python with torch and diffusers (default: bench/.venv-torch)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='docs/quality.md')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long budgets, 64 samples, 2-step samplers')
  args = parser.parse_args(argv)

  sides = set(filter(None, args.sides.split(',')))
  if not sides <= {'peer', 'ours'}:
    parser.error(f'--sides {args.sides!r}: expected peer, ours or both')
  budgets_s = sorted(float(b) * 60 for b in args.budgets.split(','))
  torch_py = args.torch_python
  if torch_py is None and 'peer' in sides:
    import run as bench_run  # pylint: disable=g-import-not-at-top
    bench_run.ensure_torch_venv()
    torch_py = bench_run.TORCH_PY
  os.makedirs(args.root, exist_ok=False)
  datasets.describe('digits').prepare(args.data_dir)
  scorer = Scorer(args.data_dir)
  np.savez(os.path.join(args.root, 'train.npz'), images=scorer.train)
  samplers = parse_samplers(args.samplers)
  num, ref_num = args.num, args.ref_num
  peer_samplers = tuple((k, int(n)) for k, n in (x.split(':') for x in
                                                  filter(None, args.peer_samplers.split(','))))
  reference = REFERENCE
  if args.smoke:
    samplers = [sampler_config.SamplerConfig(c.kind, steps=2, churn=c.churn) for c in samplers]
    peer_samplers, reference = tuple((k, 2) for k, _ in peer_samplers), ('ddpm', 3)

  # 1. Training, alternating: the peer's one run, then ours, largest budget first.
  runs = {}
  if 'peer' in sides:
    for b, r in train_peer(args, torch_py, budgets_s, args.root).items():
      runs['peer', b] = r
      print(json.dumps(r), flush=True)
  if 'ours' in sides:
    for b in reversed(budgets_s):
      runs['ours', b] = train_ours(args, b, args.root)
      print(json.dumps(runs['ours', b]), flush=True)

  # 2–3. Sampling and scoring, the sides alternating at each budget.
  rows = []
  def add(run, images, row):
    row = dict(side=run['side'], budget_min=run['budget_s'] / 60, steps=run['steps'],
               train_s=run['train_s'], num=len(images), **row,
               **scorer(images, ref_num or num))
    rows.append(row)
    print(json.dumps(row), flush=True)

  for b in budgets_s:
    largest = b == budgets_s[-1]
    if 'peer' in sides:
      for kind, steps in peer_samplers + ((reference,) if largest and ref_num else ()):
        n = ref_num if (kind, steps) == reference else num
        add(runs['peer', b], *sample_peer(args, torch_py, runs['peer', b], kind, steps, n,
                                          args.root))
    if 'ours' in sides:
      ref = [sampler_config.SamplerConfig(reference[0], steps=reference[1])] if largest and ref_num else []
      for cfg in samplers + ref:
        n = ref_num if cfg in ref else num
        add(runs['ours', b], *sample_ours(args, runs['ours', b], cfg, n))

  speed_rows = speed(args, torch_py, args.root) if args.speed else []
  report(args, list(runs.values()), rows, speed_rows)


def report(args, runs, rows, speed_rows):
  out_dir = os.path.dirname(args.out) or '.'
  os.makedirs(out_dir, exist_ok=True)
  import run as bench_run  # pylint: disable=g-import-not-at-top
  machine = dict(cpu=bench_run.cpu_model(), cores=os.cpu_count(), jax=jax.__version__)
  with open(os.path.join(out_dir, 'quality.json'), 'w') as f:
    json.dump(dict(machine=machine, args=vars(args), runs=runs, rows=rows, speed=speed_rows),
              f, indent=1, default=str)
  lines = [f'Machine: {machine["cpu"]}, {machine["cores"]} cores; jax {machine["jax"]}. '
           f'Our side: `{args.config}`' + (f' with {", ".join(args.set)}' if args.set else '')
           + '.', '', '### Training', '',
           '| side | budget (min) | steps | training s | process s | load |',
           '|---|---:|---:|---:|---:|---:|']
  for r in sorted(runs, key=lambda r: (r['budget_s'], r['side'])):
    lines.append(f"| {r['side']} | {r['budget_s'] / 60:g} | {r['steps']} | {r['train_s']:.0f} | "
                 f"{r['process_s']:.0f} | {r['load']:.1f} |")
  lines += ['', '### Quality against training minutes and sampling seconds', '',
            f'FID at N is over all N samples; FID at {args.ref_num} over the first '
            f'{args.ref_num} of them, to compare with the 1,000-step references (FID is '
            'biased upwards at small N).', '',
            f'| training min | side | sampler | evaluations | N | sampling s | FID | '
            f'FID at {args.ref_num} | IS | precision | recall | NN ratio | copies | load |',
            '|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in sorted(rows, key=lambda r: (r['budget_min'], r['side'] != 'ours')):
    lines.append(
        f"| {r['budget_min']:g} | {r['side']} | {r['sampler']} | {r['evaluations']} | "
        f"{r['num']} | {r['sample_s']:.0f} | {r['fid']:.2f} | {r['fid_small']:.2f} | "
        f"{r['inception_score']:.2f} | "
        f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nn_ratio']:.2f} | "
        f"{r['copies']:.3f} | {r['load']:.1f} |")
  if speed_rows:
    lines += ['', '### Sampling speed, same U-Net, same batch (images/s, compile excluded)', '',
              '| sampler | steps | batch | ours | peer | ours / peer |', '|---|---:|---:|---:|---:|---:|']
    for ours, peer in zip(speed_rows[1::2], speed_rows[0::2]):
      lines.append(f"| {ours['sampler']} | {ours['steps']} | {ours['batch']} | "
                   f"{ours['images_per_s']:.1f} | {peer['images_per_s']:.1f} | "
                   f"{ours['images_per_s'] / peer['images_per_s']:.2f}× |")
    lines.append(f"\nU-Net parameters: ours {speed_rows[1]['num_params']:,}, "
                 f"peer {speed_rows[0]['num_params']:,}.")
  with open(args.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
