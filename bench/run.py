r"""Benchmarks diffusion_jax against the PyTorch reference (diffusers) on this machine.

  python bench/run.py            # everything; writes docs/benchmarks.md (about 15 minutes)
  python bench/run.py --tiny --out /tmp/bench.md   # smoke test: tiny U-Net, JAX side only

Run it with the project's Python (the one with diffusion_jax's dependencies). The PyTorch
side runs in its own virtual environment, `bench/.venv-torch`, made on the first run:
torch 2.13.0 (the CPU wheel on this machine's disk) and diffusers without torchvision.

Each measurement runs in a process of its own, one after another (never two at once), so
that both sides get the same cores and each process's peak memory is its own. The table is
printed and written between the markers of the output file; the text around them is kept.
Raw numbers go to `bench/results.json` (with `--tiny`, next to `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCH_VENV = os.path.join(HERE, '.venv-torch')
TORCH_PY = os.path.join(TORCH_VENV, 'bin', 'python')
TORCH_VERSION = '2.13.0'
DIFFUSERS_VERSION = '0.42.1'
# diffusers' own dependencies, installed with theirs; diffusers itself goes in with --no-deps
# so that nothing pulls torchvision (which diffusers imports whenever it is installed).
DIFFUSERS_DEPS = ('huggingface_hub', 'importlib_metadata', 'numpy', 'Pillow', 'regex',
                  'requests', 'safetensors', 'packaging', 'filelock')
BEGIN, END = '<!-- bench:begin -->', '<!-- bench:end -->'


# ------------------------------------------------------------------------------------------
# The PyTorch environment.
# ------------------------------------------------------------------------------------------


def ensure_torch_venv() -> None:
  """Makes bench/.venv-torch unless it already imports torch and diffusers."""
  check = [TORCH_PY, '-c', 'import torch, diffusers']
  if os.path.exists(TORCH_PY) and subprocess.run(check, capture_output=True).returncode == 0:
    return
  print(f'making {TORCH_VENV} (torch {TORCH_VERSION}, diffusers {DIFFUSERS_VERSION})',
        flush=True)
  base = getattr(sys, '_base_executable', sys.executable)
  subprocess.run([base, '-m', 'venv', '--clear', TORCH_VENV], check=True)
  pip = [TORCH_PY, '-m', 'pip', 'install', '-q']
  # Exactly this version: it is a CPU build on this machine's disk. A plain `torch` would
  # fetch a CUDA build of several GB.
  subprocess.run(pip + [f'torch=={TORCH_VERSION}'], check=True)
  subprocess.run(pip + ['--no-deps', f'diffusers=={DIFFUSERS_VERSION}'], check=True)
  subprocess.run(pip + list(DIFFUSERS_DEPS), check=True)
  subprocess.run(check, check=True)


# ------------------------------------------------------------------------------------------
# The machine.
# ------------------------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def cpu_flags() -> str:
  """The vector extensions that matter for float32 kernels."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = set(line.split(':', 1)[1].split())
          wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile')
          return ' '.join(w for w in wanted if w in flags) or '-'
  except OSError:
    pass
  return '-'


def memory_gib() -> float:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return float('nan')


def load_average() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def versions(with_torch: bool) -> dict:
  code = ('import json, jax, jaxlib, flax, optax; print(json.dumps(dict(jax=jax.__version__, '
          'jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__)))')
  out = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                  check=True).stdout)
  out['python'] = platform.python_version()
  if with_torch:
    code = ('import json, torch, diffusers; print(json.dumps(dict(torch=torch.__version__, '
            'diffusers=diffusers.__version__)))')
    out.update(json.loads(subprocess.run([TORCH_PY, '-c', code], capture_output=True, text=True,
                                         check=True).stdout))
  return out


# ------------------------------------------------------------------------------------------
# Running the measurements.
# ------------------------------------------------------------------------------------------


def measure(side: str, what: str, *args: str, tiny: bool = False) -> dict:
  """Runs one measurement in its own process and returns its JSON line (with several
  comma-separated measurements, a list of them)."""
  if side == 'jax':
    cmd = [sys.executable, os.path.join(HERE, 'jax_bench.py'), what, *args]
    if tiny:
      cmd.append('--tiny')
  else:
    cmd = [TORCH_PY, os.path.join(HERE, 'torch_bench.py'), what, *args]
  print(f'  {side:5s} {what} {" ".join(args)}', end=' ', flush=True)
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    sys.stderr.write(proc.stdout + proc.stderr)
    raise RuntimeError(f'{" ".join(cmd)} failed with exit code {proc.returncode}')
  n = len(what.split(','))
  results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-n:]]
  for result in results:
    result['process_s'] = time.time() - start
    result['load_after'] = os.getloadavg()[0]
  print(f'({time.time() - start:.0f} s, load {os.getloadavg()[0]:.2f})', flush=True)
  return results if n > 1 else results[0]


def measure_digits(steps: int) -> dict:
  """`train.py` on the embedded digits: steps/s from its own log lines, input pipeline
  included. The first log interval (compilation) is left out."""
  log_every = max(steps // 6, 1)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, 'train.py', '--config', 'configs/digits.py',
           '--workdir', os.path.join(tmp, 'work'),
           f'--config.data.data_dir={os.path.join(tmp, "data")}',
           f'--config.training.num_train_steps={steps}',
           f'--config.training.log_every_steps={log_every}',
           '--config.training.sample_every_steps=0']
    print(f'  jax   train.py digits {steps} steps', end=' ', flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
  if proc.returncode:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise RuntimeError(f'{" ".join(cmd)} failed with exit code {proc.returncode}')
  rates = [float(x) for x in re.findall(r'\| ([0-9.]+) steps/s', proc.stderr + proc.stdout)]
  batch = int(re.search(r'global batch (\d+)', proc.stderr + proc.stdout).group(1))
  print(f'({wall:.0f} s)', flush=True)
  after_warmup = rates[1:] or rates
  steps_per_s = statistics.median(after_warmup)
  return dict(steps_per_s=steps_per_s, images_per_s=steps_per_s * batch, batch=batch,
              log_rates=rates, wall_s=wall, steps=steps)


def run_all(args) -> dict:
  """Every measurement, in a fixed order; returns them keyed by name."""
  rep = ['--warmup', str(args.warmup), '--repeats', str(args.repeats)]
  few = ['--warmup', '1', '--repeats', str(max(args.repeats // 2, 1))]  # slow ones
  r = {}
  if args.tiny:  # one process, a small U-Net on 8x8 images, XLA's cheap compile
    (r['jax_train_8'], r['jax_forward_8'], r['jax_sample_8'], r['jax_matmul']) = measure(
        'jax', 'train,forward,sample,matmul', '--batch', '8', '--steps', '2', '--size', '256',
        *rep, tiny=True)
    return r
  # The two sides take turns measurement by measurement, so that a change in the machine's
  # load during the run falls on both alike.
  plan = [('matmul', ('--size', '4096'), rep), ('forward_8', ('--batch', '8'), rep),
          ('train_8', ('--batch', '8'), rep), ('train_32', ('--batch', '32'), few),
          ('train_32x2', ('--batch', '32', '--accum', '2'), few),
          ('sample_8', ('--batch', '8', '--steps', '4'), rep),
          ('sample_64', ('--batch', '64', '--steps', '2'), few)]
  for key, extra, reps in plan:
    what = key.split('_')[0]
    r['jax_' + key] = measure('jax', what, *extra, *reps)
    if not args.skip_torch:
      r['torch_' + key] = measure('torch', what, *extra, *reps)
  r['jax_library_8'] = measure('jax', 'library_step', '--batch', '8', *rep)
  if not args.skip_digits:
    print('train.py on the digits:', flush=True)
    r['digits'] = measure_digits(args.digits_steps)
  return r


# ------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
  return '—' if x is None else format(x, spec)


def _get(r: dict, key: str, field: str):
  return r[key][field] if key in r else None


def _ratio(a, b):
  return None if a is None or b is None or not b else a / b


def report(r: dict, machine: dict, tiny: bool) -> str:
  """The markdown report: the machine, then the tables."""
  lines = []
  add = lines.append
  v = machine['versions']
  add(f'Measured {machine["date"]} with `python bench/run.py{" --tiny" if tiny else ""}`.')
  add('')
  add(f'- CPU: {machine["cpu"]}, {machine["cores"]} cores usable '
      f'({machine["flags"]}), {machine["memory_gib"]:.0f} GiB memory')
  add(f'- Python {v["python"]}; jax {v["jax"]}, jaxlib {v["jaxlib"]}, flax {v["flax"]}, '
      f'optax {v["optax"]}' + (f'; torch {v["torch"]}, diffusers {v["diffusers"]}'
                               if 'torch' in v else ''))
  add(f'- Threads: torch.set_num_threads({machine["cores"]}); XLA runs its intra-op pool at '
      f'its default size, the number of usable cores ({machine["cores"]})'
      + (f'; XLA_FLAGS={machine["xla_flags"]!r}' if machine['xla_flags'] else ''))
  add(f'- Load average (1, 5, 15 min) before: {machine["load_before"]}; '
      f'after: {machine["load_after"]}')
  add('')

  def speed_row(name, key, field, higher_is_better=True, spec='.2f'):
    ours, theirs = _get(r, 'jax_' + key, field), _get(r, 'torch_' + key, field)
    ratio = _ratio(ours, theirs) if higher_is_better else _ratio(theirs, ours)
    add(f'| {name} | {_fmt(ours, spec)} | {_fmt(theirs, spec)} | {_fmt(ratio, ".2f")}× |')

  add('| measurement | diffusion_jax | PyTorch (diffusers) | speed, ours / theirs |')
  add('|---|---:|---:|---:|')
  for b in (8, 32):
    speed_row(f'train step, batch {b}: images/s', f'train_{b}', 'images_per_s')
  speed_row('train step, batch 32 as 2 micro-batches of 16: images/s', 'train_32x2',
            'images_per_s')
  speed_row('forward (eval), batch 8: images/s', 'forward_8', 'images_per_s')
  for b in (8, 64):
    speed_row(f'sampling, batch {b}: s / denoising step', f'sample_{b}', 'seconds_per_step',
              higher_is_better=False, spec='.3f')
    speed_row(f'sampling, batch {b}: projected s / 1,000 steps', f'sample_{b}',
              'projected_1000_s', higher_is_better=False, spec='.0f')
  add('')

  add('| resources | diffusion_jax | PyTorch (diffusers) |')
  add('|---|---:|---:|')
  for b in ('8', '32', '32x2'):
    add(f'| train step, batch {b}: peak resident memory (MiB) | '
        f'{_fmt(_get(r, f"jax_train_{b}", "peak_rss_mib"), ".0f")} | '
        f'{_fmt(_get(r, f"torch_train_{b}", "peak_rss_mib"), ".0f")} |')
  for b in ('8', '32', '32x2'):
    add(f'| train step, batch {b}: cores busy (CPU s / wall s) | '
        f'{_fmt(_get(r, f"jax_train_{b}", "cores_busy"), ".2f")} | '
        f'{_fmt(_get(r, f"torch_train_{b}", "cores_busy"), ".2f")} |')
  add(f'| sampling, batch 8: cores busy | {_fmt(_get(r, "jax_sample_8", "cores_busy"), ".2f")} '
      f'| {_fmt(_get(r, "torch_sample_8", "cores_busy"), ".2f")} |')
  for key in ('train_8', 'train_32', 'sample_8'):
    add(f'| {key.replace("_", ", batch ")}: XLA compile (s) | '
        f'{_fmt(_get(r, "jax_" + key, "compile_s"), ".0f")} | — |')
  add('')

  mm = _get(r, 'jax_matmul', 'gflops_per_s')
  add('| FLOPs (XLA cost analysis) and rates | value |')
  add('|---|---:|')
  add(f'| U-Net forward, GFLOP / image | '
      f'{_fmt(_get(r, "jax_forward_8", "flops_per_image") and r["jax_forward_8"]["flops_per_image"] / 1e9, ".2f")} |')
  add(f'| train step, GFLOP / image (batch 8) | '
      f'{_fmt(_get(r, "jax_train_8", "flops_per_image") and r["jax_train_8"]["flops_per_image"] / 1e9, ".2f")} |')
  nbytes = _get(r, 'jax_train_8', 'bytes_accessed')
  if nbytes:
    add(f'| train step, MB read + written per image (batch 8; XLA:CPU\'s fusion) | '
        f'{nbytes / r["jax_train_8"]["batch"] / 1e6:.0f} |')
  add(f'| float32 matmul {_get(r, "jax_matmul", "n")}², XLA: GFLOP/s (the ceiling) | '
      f'{_fmt(mm, ".0f")} |')
  if 'torch_matmul' in r:
    add(f'| float32 matmul {r["torch_matmul"]["n"]}², PyTorch: GFLOP/s | '
        f'{r["torch_matmul"]["gflops_per_s"]:.0f} |')
  for key, name in (('forward_8', 'forward, batch 8'), ('train_8', 'train step, batch 8'),
                    ('train_32', 'train step, batch 32'),
                    ('train_32x2', 'train step, batch 32 as 2 x 16')):
    g = _get(r, 'jax_' + key, 'gflops_per_s')
    if g is not None:
      add(f'| {name}: GFLOP/s achieved (share of the matmul rate) | {g:.0f} '
          f'({_fmt(_ratio(g, mm) and 100 * _ratio(g, mm), ".0f")}%) |')
  if 'jax_library_8' in r:
    add(f'| library `train_step` (clip, warm-up, EMA, shard_map), batch 8: images/s | '
        f'{r["jax_library_8"]["images_per_s"]:.2f} |')
  if 'digits' in r:
    dg = r['digits']
    add(f'| `train.py` on the digits (batch {dg["batch"]}, 8×8, input pipeline included): '
        f'steps/s | {dg["steps_per_s"]:.2f} |')
    add(f'| `train.py` on the digits: images/s | {dg["images_per_s"]:.0f} |')
  return '\n'.join(lines) + '\n'


def write_between_markers(path: str, body: str) -> None:
  """Replaces the text between BEGIN and END in `path` (made if missing) with `body`."""
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  block = f'{BEGIN}\n{body}{END}'
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:
    text = (text.rstrip() + '\n\n' if text else '# Benchmarks\n\n') + block + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'benchmarks.md'))
  parser.add_argument('--tiny', action='store_true',
                      help='tiny U-Net, 1 repeat, JAX side only (the smoke test)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--skip-torch', action='store_true', help='JAX side only')
  parser.add_argument('--skip-digits', action='store_true', help='no train.py run')
  parser.add_argument('--digits-steps', type=int, default=300)
  args = parser.parse_args(argv)
  if args.tiny:
    args.repeats, args.warmup, args.skip_torch, args.skip_digits = 1, 1, True, True
  if not args.skip_torch:
    ensure_torch_venv()

  machine = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      cpu=cpu_model(), flags=cpu_flags(), cores=len(os.sched_getaffinity(0)),
      memory_gib=memory_gib(), versions=versions(not args.skip_torch),
      xla_flags=os.environ.get('XLA_FLAGS', ''), load_before=load_average())
  results = run_all(args)
  machine['load_after'] = load_average()
  text = report(results, machine, args.tiny)
  print()
  print(text)
  write_between_markers(args.out, text)
  raw = (os.path.splitext(args.out)[0] + '.json' if args.tiny
         else os.path.join(HERE, 'results.json'))
  with open(raw, 'w') as f:
    json.dump(dict(machine=machine, results=results), f, indent=1)
  print(f'wrote {args.out} and {raw}')


if __name__ == '__main__':
  if shutil.which('nproc') is None and not hasattr(os, 'sched_getaffinity'):
    sys.exit('needs Linux (os.sched_getaffinity, /proc)')
  main()
