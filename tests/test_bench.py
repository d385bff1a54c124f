"""Smoke test of the benchmark: `bench/run.py --tiny` runs end to end and writes its table.

Only the JAX side, a tiny U-Net on 8x8 images and one repeat: no PyTorch environment is made
and nothing under docs/ is touched. The real benchmark is not part of the test suite.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_tiny_runs_and_writes_its_table(tmp_path):
  out = tmp_path / 'bench.md'
  out.write_text('# Notes kept around the table\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n'
                 'and after it.\n')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'run.py'), '--tiny', '--out', str(out)],
      capture_output=True, text=True, timeout=180, cwd=ROOT)
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
