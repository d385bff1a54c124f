"""A workdir on a filesystem that is not the local disk: train, resume and sample with
`--workdir gs://...` against the in-memory GCS server of tests/fake_gcs.py (gcsfs carries
epath's files, TensorStore orbax's arrays; nothing leaves 127.0.0.1)."""

import io
import os
import subprocess
import sys
import uuid

import numpy as np
from etils import epath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(env, script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


def test_train_resume_and_sample_on_gcs(child_env, fake_gcs, fake_gcs_server, tmp_path):
  run = f'{fake_gcs}/runs/{uuid.uuid4().hex[:8]}'
  env = {**child_env['env'], **fake_gcs_server.env()}
  cwd_before = sorted(os.listdir(ROOT))
  train = ('train.py', f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
           f'--workdir={run}', f'--config.data.data_dir={child_env["data_dir"]}',
           '--config.training.checkpoint_every_steps=2', '--config.training.log_every_steps=1')
  first = _run(env, *train, '--config.training.num_train_steps=2')
  assert first.returncode == 0, first.stderr[-3000:]
  second = _run(env, *train, '--config.training.num_train_steps=4')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed from checkpoint 2' in second.stderr

  names = fake_gcs_server.names()
  prefix = run[len(fake_gcs) + 1:] + '/'
  assert {f'{prefix}spec.json', f'{prefix}config.json', f'{prefix}spec_changes.jsonl'} <= set(names)
  for step in (2, 4):
    assert any(n.startswith(f'{prefix}checkpoints/{step}/ema/') for n in names), step
  assert any(n.startswith(f'{prefix}tensorboard/events.') for n in names)

  out = f'{run}/samples_ddim'
  sampled = _run(env, 'sample.py', f'--workdir={run}', '--num_samples=8', '--sampler=ddim',
                 '--steps=3', f'--output={out}')
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert 'checkpoint 4' in sampled.stdout
  with np.load(io.BytesIO(epath.Path(f'{out}/samples.npz').read_bytes())) as f:
    images = f['images']
  assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
  assert epath.Path(f'{out}/grid.png').exists()
  # Nothing went to the local disk under the remote name.
  assert sorted(os.listdir(ROOT)) == cwd_before
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
