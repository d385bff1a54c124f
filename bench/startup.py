"""Start-up cost, cold and warm, and the training loop's own overhead.

  .venv/bin/python bench/startup.py            # both parts, ≈ 8 min on 2 cores
  .venv/bin/python bench/startup.py --only startup
  .venv/bin/python bench/startup.py --only loop [--steps 3000]
  .venv/bin/python bench/startup.py --tiny     # the smoke test: tiny model, few steps

**startup**: each program runs twice in a fresh process, first with an empty persistent
compilation cache (cold), then with the cache the first run filled (warm):
- `train.py --config configs/digits.py` to its first step (its `startup:` log line: the time
  from the program's start to the first step done, and the train step's compile seconds);
- `sample.py` to its first batch of samples (one batch of 64), with the default sampler and
  with `--sampler ddpm`, on a digits workdir (random parameters: the cost does not depend on
  them);
- `python evaluate.py`, its first evaluation (64 test digits' bits/dim and 64
  samples' FID).
The wall time is the whole process; the compile seconds are what the programs' own lines say
(`compilation.track`: tracing, lowering and the XLA compile or the cache read).

**loop**: the trainer's loop (`train.train_and_evaluate` on the digits config, its
`data_parallel_step` included) with the per-device U-Net step replaced by one of negligible
device work, so that steps/s measures the host: reading
and placing each batch, dispatching the step, logging. For the `grain` and the `memory`
pipeline, and the latter with several steps per call (`training.steps_per_call`, a
`lax.scan` over that many batches per dispatch; `--steps_per_call 1,8`). Run it on the commit
before this one (`PYTHONPATH=<old checkout>`) for the "before".

Results go to bench/startup.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT + os.pathsep + env.get('PYTHONPATH', ''))
  env.pop('DIFFUSION_JAX_COMPILATION_CACHE', None)
  return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
  start = time.time()
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.time() - start
  if out.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return wall, out.stdout + out.stderr


_COMPILED = re.compile(r'compiled (\w+): ([\d.]+) s .*?cache ([\w/() ]+)$', re.M)


def _compiled(log: str) -> dict[str, tuple[float, str]]:
  return {m.group(1): (float(m.group(2)), m.group(3).strip()) for m in _COMPILED.finditer(log)}


def _digits_workdir(base: str, data_dir: str) -> str:
  """A digits workdir (random parameters, written without compiling), as the tests make."""
  sys.path.insert(0, ROOT)
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from tests import workdirs  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.data.data_dir = data_dir
  info = input_pipeline.dataset_info('digits', data_dir)
  return workdirs.write_workdir(os.path.join(base, 'digits_wd'), config, info)


def startup(args) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as base:
    data_dir = os.path.join(base, 'tfds')
    from diffusion_jax.data import digits as digits_data  # pylint: disable=g-import-not-at-top
    digits_data.prepare_digits(data_dir)
    workdir = _digits_workdir(base, data_dir)
    steps = ['--config.diffusion.num_timesteps=50'] if args.tiny else []
    programs = {
        'train.py, digits: first step': [
            PY, 'train.py', '--config=configs/digits.py',
            f'--config.data.data_dir={data_dir}', '--config.training.num_train_steps=1',
            '--config.training.sample_every_steps=0', *steps],
        'sample.py, default sampler: first 64 samples': [
            PY, 'sample.py', f'--workdir={workdir}', '--num_samples=64', '--overwrite'],
        'sample.py --sampler ddpm: first 64 samples': [
            PY, 'sample.py', f'--workdir={workdir}', '--num_samples=64', '--sampler=ddpm',
            '--overwrite', f'--output={base}/ddpm'],
        'evaluate: first evaluation (64 bits/dim, 64 FID)': [
            PY, os.path.join(ROOT, 'evaluate.py'), f'--workdir={workdir}', '--num_samples=64',
            '--bpd_examples=64', '--steps=20' if args.tiny else '--steps=100'],
    }
    if args.tiny:
      programs = {k: v + (['--steps=5'] if 'sample.py' in k else []) for k, v in
                  programs.items()}
    for name, cmd in programs.items():
      cache = os.path.join(base, 'cache_' + re.sub(r'\W+', '_', name))
      row = dict(program=name)
      for phase in ('cold', 'warm'):
        if name.startswith('train.py'):
          cmd_run = cmd + [f'--workdir={base}/train_{phase}']
        else:
          cmd_run = cmd
        wall, log = _run(cmd_run, _env(cache))
        compiled = _compiled(log)
        if name.startswith('train.py'):
          m = re.search(r'first step done ([\d.]+) s after the start', log)
          row[f'{phase}_to_first_s'] = float(m.group(1))
        else:
          row[f'{phase}_to_first_s'] = wall
        if name.startswith('evaluate'):
          result = json.loads(log[log.index('{'):log.rindex('}') + 1])
          compiled = {k[len('compile_seconds_'):]: (v, result.get(
              'compile_cache_' + k[len('compile_seconds_'):])) for k, v in result.items()
                      if k.startswith('compile_seconds_')}
        row[f'{phase}_compile_s'] = sum(v for v, _ in compiled.values())
        row[f'{phase}_cache'] = ', '.join(f'{k} {c}' for k, (_, c) in compiled.items())
        row[f'{phase}_wall_s'] = wall
        print(f'{name} [{phase}]: to first {row[f"{phase}_to_first_s"]:.1f} s, compile '
              f'{row[f"{phase}_compile_s"]:.1f} s ({row[f"{phase}_cache"]})', flush=True)
      rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------
# The loop's overhead.
# ------------------------------------------------------------------------------------------


def _negligible_step(state, batch, rng, **unused):
  """In place of `train_step.train_step` (same signature, run by the trainer's own
  `data_parallel_step`): the step counter advances and the metrics are a few reductions of
  the batch; no U-Net."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del rng, unused
  m = jax.lax.pmean(jnp.mean(batch['image']), 'data')
  metrics = dict(loss=m, mse=m, vb=m, grad_norm=m + 1.0,
                 learning_rate=jnp.asarray(1e-3, jnp.float32))
  return state.replace(step=state.step + 1), metrics


def loop(args) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import loop as train  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import digits as digits_data  # pylint: disable=g-import-not-at-top
  train.step_lib.train_step = _negligible_step
  rows = []
  with tempfile.TemporaryDirectory() as base:
    data_dir = os.path.join(base, 'tfds')
    digits_data.prepare_digits(data_dir)
    cases = [('grain', 1)] + [('memory', k) for k in args.steps_per_call]
    for pipeline, k in cases:
      config = digits.get_config()
      config.data.data_dir = data_dir
      if 'pipeline' in config.data:
        config.data.pipeline = pipeline
      elif pipeline != 'grain':
        continue  # the code before the in-memory pipeline
      if k > 1 and 'steps_per_call' not in config.training:
        continue  # the code before several steps per call
      if k > 1:
        config.training.steps_per_call = k
      config.training.num_train_steps = args.steps
      config.training.log_every_steps = args.steps // 2
      config.training.checkpoint_every_steps = 10 * args.steps
      config.training.sample_every_steps = 0
      # Steps/s between the two log lines: the second half of the run, all compiled.
      rates = []

      class Grab:
        def filter(self, record):
          m = re.search(r'\| ([\d.]+) steps/s', record.getMessage())
          if m:
            rates.append(float(m.group(1)))
          return True
      import logging as std_logging  # pylint: disable=g-import-not-at-top
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.set_verbosity(logging.INFO)
      handler = std_logging.getLogger('absl')
      grab = Grab()
      handler.addFilter(grab)
      try:
        train.train_and_evaluate(config, os.path.join(base, f'wd_{pipeline}_{k}'))
      finally:
        handler.removeFilter(grab)
      row = dict(pipeline=pipeline, steps_per_call=k, steps=args.steps, steps_per_s=rates[-1],
                 host_ms_per_step=1e3 / rates[-1], devices=jax.device_count())
      print(f'loop, {pipeline} pipeline, {k} steps per call: {row["steps_per_s"]:.0f} steps/s '
            f'({row["host_ms_per_step"]:.2f} ms per step)', flush=True)
      rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', choices=('startup', 'loop'))
  parser.add_argument('--steps', type=int, default=4000, help='loop: steps per run')
  parser.add_argument('--steps_per_call', type=lambda v: [int(x) for x in v.split(',')],
                      default=[1, 8], help='loop: training.steps_per_call values (memory '
                      'pipeline), comma-separated; each must divide --steps / 2')
  parser.add_argument('--tiny', action='store_true', help='smoke test: small and short')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'startup.json'))
  args = parser.parse_args()
  if args.tiny:
    args.steps = min(args.steps, 40)
    args.steps_per_call = [k for k in args.steps_per_call if (args.steps // 2) % k == 0]
  bad = [k for k in args.steps_per_call if k < 1 or (args.steps // 2) % k]
  if bad:
    parser.error(f'--steps_per_call values must be >= 1 and divide --steps / 2 = '
                 f'{args.steps // 2}, got {bad}')
  results = dict(load_before=os.getloadavg()[0])
  if args.only in (None, 'loop'):
    results['loop'] = loop(args)
  if args.only in (None, 'startup'):
    results['startup'] = startup(args)
  results['load_after'] = os.getloadavg()[0]
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
  print()
  if 'startup' in results:
    print('| program | cold: to first / compile | warm: to first / compile | compile ÷ | '
          'to first ÷ | warm cache |')
    print('|---|---|---|---|---|---|')
    for r in results['startup']:
      print(f'| {r["program"]} | {r["cold_to_first_s"]:.1f} s / {r["cold_compile_s"]:.1f} s | '
            f'{r["warm_to_first_s"]:.1f} s / {r["warm_compile_s"]:.1f} s | '
            f'{r["cold_compile_s"] / max(r["warm_compile_s"], 1e-9):.1f}× | '
            f'{r["cold_to_first_s"] / max(r["warm_to_first_s"], 1e-9):.1f}× | '
            f'{r["warm_cache"]} |')
  if 'loop' in results:
    print('\n| pipeline | steps per call | steps/s (negligible step) | host ms per step |')
    print('|---|---|---|---|')
    for r in results['loop']:
      print(f'| {r["pipeline"]} | {r.get("steps_per_call", 1)} | {r["steps_per_s"]:.0f} | '
            f'{r["host_ms_per_step"]:.2f} |')


if __name__ == '__main__':
  main()
