"""Smoke tests of the benchmarks: `bench/run.py --tiny` (the JAX side, a tiny U-Net on 8x8
images, one repeat) and `bench/quality.py --smoke` (both sides, seconds-long budgets) run end
to end and write their tables; the quality benchmark's copy check on made-up digits. Nothing
under docs/ is touched; the real benchmarks are not part of the test suite.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import oracles  # tests/ is on sys.path under pytest's rootdir conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke runs check paths and that the numbers are sane, not speed. Their child processes get
# * XLA's cheap compile for every program (the scripts ask for it only for the measured ones;
#   parameter initialisation and small eager ops at the default level took most of the time);
# * PyTorch on one thread: on a busy 2-core machine (as under the test run) its two threads
#   made its small ops 5-10 times slower.
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def _smoke_env() -> dict:
  """os.environ (the session's shared compilation cache included) with `FAST_XLA_FLAGS` added to
  any XLA_FLAGS already set, and PyTorch on one thread."""
  env = dict(os.environ, OMP_NUM_THREADS='1')
  env['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS', ''), FAST_XLA_FLAGS) if f)
  return env


@pytest.mark.slow
def test_bench_tiny_runs_and_writes_its_table(tmp_path):
  out = tmp_path / 'bench.md'
  out.write_text('# Notes kept around the table\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n'
                 'and after it.\n')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'run.py'), '--tiny', '--out', str(out)],
      capture_output=True, text=True, timeout=180, cwd=ROOT, env=_smoke_env())
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

  text = out.read_text()
  assert text.startswith('# Notes kept around the table') and text.endswith('and after it.\n')
  assert 'old' not in text
  assert '| train step, batch 8: images/s |' in text
  assert 'CPU:' in text and 'jax ' in text

  raw = json.loads((tmp_path / 'bench.json').read_text())['results']
  for key in ('jax_train_8', 'jax_forward_8'):
    assert raw[key]['images_per_s'] > 0 and raw[key]['flops_per_image'] > 0
  assert raw['jax_sample_8']['seconds_per_step'] > 0
  assert raw['jax_matmul']['gflops_per_s'] > 0


@pytest.mark.slow
def test_ab_runs_variants_in_one_process_and_rejects_bad_options():
  ab = os.path.join(ROOT, 'bench', 'ab.py')
  proc = subprocess.run(
      [sys.executable, ab, 'forward', '--tiny', '--rounds', '2',
       'eigen={"xla_cpu_experimental_ynn_fusion_type": ""}'],
      capture_output=True, text=True, timeout=180, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split() for line in proc.stdout.splitlines()]
  assert [r[0] for r in rows] == ['default', 'eigen']
  assert rows[0][-1] == 'x1.000' and float(rows[1][1]) > 0

  bad = subprocess.run([sys.executable, ab, 'forward', '--tiny', 'eigen={not json'],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert bad.returncode == 2 and "variant 'eigen={not json'" in bad.stderr


def _quality_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('quality', os.path.join(ROOT, 'bench',
                                                                         'quality.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quality_copy_check_tells_copies_from_new_digits():
  quality = _quality_module()
  rng, _ = oracles.new_rng()
  train = rng.integers(0, 256, (300, 8, 8, 1)).astype(np.uint8)
  # 1,000 held-out digits: the 1% threshold is then their 10th nearest, not a single draw (with
  # 100, one seed in twenty put fresh digits' `copies` above 5%).
  test = rng.integers(0, 256, (1000, 8, 8, 1)).astype(np.uint8)
  d = quality.nearest_distances(test, train)
  brute = np.sqrt(((test.reshape(1000, 1, -1).astype(np.float64)
                    - train.reshape(1, 300, -1)) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(d, brute, rtol=1e-9)
  # Training digits replayed: distance 0, every one a copy.
  copied = quality.copy_check(quality.nearest_distances(train[:50], train), d)
  assert copied == dict(nn_ratio=0.0, copies=1.0)
  # Fresh digits from the same distribution: the ratio is near 1, copies near 1%.
  fresh = rng.integers(0, 256, (400, 8, 8, 1)).astype(np.uint8)
  new = quality.copy_check(quality.nearest_distances(fresh, train), d)
  assert 0.9 < new['nn_ratio'] < 1.1 and new['copies'] < 0.05, new


@pytest.mark.slow
def test_quality_smoke_runs_both_sides_and_writes_its_report(tmp_path):
  """bench/quality.py at seconds-long budgets, both sides (the peer in this Python, which the
  `bench` extra gives torch and diffusers), the speed table included. Our side trains
  configs/tiny.py cut to one level without attention (`--set`): its compile is most of our
  training seconds, and the bench's paths do not depend on the U-Net's size."""
  out = tmp_path / 'docs' / 'quality.md'
  budget_min = 0.2   # 12 s: past either side's start-up, and the peer's first steps
  budget_s = budget_min * 60
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--smoke',
       '--budgets', str(budget_min), '--config', 'configs/tiny.py', '--samplers', 'sde:2',
       '--peer_samplers', 'dpm:2', '--num', '16', '--ref_num', '8', '--speed',
       '--set', 'training.num_train_steps=100000', '--set', 'model.ch_mult=(1,)',
       '--set', 'model.attn_resolutions=()', '--root', str(tmp_path / 'root'),
       '--torch_python', sys.executable, '--out', str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=_smoke_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  raw = json.loads((out.parent / 'quality.json').read_text())
  runs = {r['side']: r for r in raw['runs']}
  assert set(runs) == {'peer', 'ours'}
  for r in runs.values():  # each stopped on its clock: after the budget, not long after
    assert r['steps'] >= 1 and budget_s <= r['train_s'] < budget_s + 90.0, r
    assert r['budget_s'] == budget_s, r
  rows = {(r['side'], r['sampler']) for r in raw['rows']}
  assert rows == {('peer', 'DPM-Solver++ 2M-2'), ('peer', 'DDPM-3'),
                  ('ours', 'sde, 2 steps (logsnr)'), ('ours', 'ddpm, 3 steps')}, rows
  for r in raw['rows']:
    assert r['num'] == (8 if 'DDPM' in r['sampler'] or 'ddpm' in r['sampler'] else 16)
    assert np.isfinite(r['fid']) and r['fid'] > 0 and 0 <= r['copies'] <= 1
  # The speed table times one U-Net: the same parameter count on both sides.
  speed = raw['speed']
  assert len(speed) == 6 and len({r['num_params'] for r in speed}) == 1, speed
  text = out.read_text()
  assert '### Training' in text and '### Sampling speed' in text and 'DPM-Solver++ 2M-2' in text


@pytest.mark.slow
def test_gpu_bench_path_runs_on_the_cpu(tmp_path):
  """bench/gpu.py's every row, scaled down to a tiny U-Net on the CPU: the GPU path cannot rot
  unseen. (The PyTorch rows run eagerly on the CPU when this Python has torch and diffusers.)"""
  out = tmp_path / 'gpu.md'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'gpu.py'), '--device', 'cpu', '--model',
       'tiny', '--batch', '4', '--steps', '2', '--warmup', '1', '--matmul-size', '256',
       '--forward-batch', '4', '--sample-batch', '4', '--ddpm-steps', '5', '--solver-steps',
       '3', '--out', str(out)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=_smoke_env())
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  table = out.read_text()
  assert proc.stdout.rstrip().endswith(table.rstrip())   # the table is printed last
  assert 'not measured' not in table, table
  assert 'not judged: this run is not on a GPU' in table
  raw = json.loads((tmp_path / 'gpu.json').read_text())['results']
  for key in ('jax_train_float32_4', 'jax_train_bfloat16_4', 'jax_forward_float32',
              'jax_forward_bfloat16'):
    assert raw[key]['seconds'] > 0 and raw[key]['flops'] > 0 and raw[key]['compile_s'] > 0, key
  assert raw['jax_sample_ddpm']['nfe'] == 5 and raw['jax_sample_dpmpp_2m']['nfe'] > 0
  assert raw['ceiling_matmul']['flops'] == 2 * 256 ** 3 and raw['ceiling_copy']['bytes'] > 0
  try:
    import torch, diffusers  # noqa: F401  pylint: disable=g-import-not-at-top,multiple-imports
  except ImportError:
    assert 'PyTorch rows skipped' in table
  else:
    assert raw['torch_eager_fp32_4']['seconds'] > 0 and raw['torch_forward_bfloat16']['seconds'] > 0
    assert "our float32 / PyTorch float32-TF32" in table


@pytest.mark.slow
def test_gpu_bench_rejects_bad_sizes_and_a_missing_gpu():
  gpu = os.path.join(ROOT, 'bench', 'gpu.py')
  bad = subprocess.run([sys.executable, gpu, '--device', 'cpu', '--batch', '0'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert bad.returncode == 2 and '--batch sizes must be >= 1, got [0]' in bad.stderr
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  none = subprocess.run([sys.executable, gpu, '--device', 'gpu'], capture_output=True,
                        text=True, timeout=120, cwd=ROOT, env=env)
  assert none.returncode == 1 and 'JAX sees no GPU here' in none.stderr
