"""The README's example runs as written, and its commands match CI's."""

import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return f.read()


@pytest.mark.slow
def test_readme_example_runs_as_written():
  blocks = re.findall(r'```python\n(.*?)```', _readme(), flags=re.S)
  assert blocks, 'README has no python example'
  scope = {}
  exec(compile(blocks[0], 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert scope['x_t'].shape == (4, 8, 8, 1)
  assert scope['loss'].shape == (4,) and np.all(np.isfinite(scope['loss']))
  assert scope['sample'].shape == (4, 8, 8, 1) and np.all(np.isfinite(scope['sample']))
  bpd = np.asarray(scope['bpd'])
  assert bpd.shape == (4,) and np.all(np.isfinite(bpd)) and np.all(bpd > 0)
  # q(x_{t-1} | x_t, x0) at t = 0 has mean x0 (coef1 = 1, coef2 = 0).
  np.testing.assert_allclose(scope['mean'][0], scope['x0'][0], atol=1e-6)


def test_ci_runs_the_readme_test_command():
  test_cmd = re.search(r'Run the tests.*?```bash\n(.*?)\n```', _readme(), flags=re.S).group(1)
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    assert test_cmd.strip() in f.read()
