"""The quickstart notebook: committed without outputs, and it runs top to bottom.

The run uses the notebook's QUICK mode (a few training steps, a few samples, bits/dim of two
digits) on the CPU, offline, with the digits dataset built in a temporary folder. The kernel is
this interpreter (`sys.executable`), through a kernel spec written for the test, so the run does
not depend on which `python3` kernel happens to be installed.
"""

import json
import math
import os
import re
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'quickstart.ipynb')
KERNEL_NAME = 'diffusion-jax-test'
CIFAR10_PARAMS = '35,746,307'  # the U-Net at the paper's CIFAR-10 settings
# Named in the kernel spec when set (tests/conftest.py sets them), so that the kernel compiles
# into the run's shared cache, not ~/.cache, whatever else of os.environ reaches it.
CACHE_VARIABLES = ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE',
                   'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                   'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == 'code']
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [], cell.source[:80]
    assert cell.execution_count is None, cell.source[:80]
  assert 'widgets' not in nb.metadata  # saved widget state is an output too


def test_first_code_cell_installs_only_when_missing():
  first = next(c for c in _read().cells if c.cell_type == 'code')
  assert 'pip' in first.source and 'git+' in first.source
  assert 'except ImportError' in first.source


def _kernel_manager(tmp_path, env):
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  spec_dir = tmp_path / 'kernels' / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = dict(argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
              display_name='diffusion_jax test', language='python', env=env)
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / 'kernels')])
  return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _outputs(nb, output_type):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if o.output_type == output_type]


@pytest.mark.slow
def test_notebook_runs_in_quick_mode(tmp_path):
  from nbclient import NotebookClient

  pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  env = dict(PYTHONPATH=pythonpath, JAX_PLATFORMS='cpu',
             DIFFUSION_JAX_QUICKSTART_QUICK='1',
             DIFFUSION_JAX_DATA_DIR=str(tmp_path / 'data'))
  env.update((k, os.environ[k]) for k in CACHE_VARIABLES if k in os.environ)
  workdir = tmp_path / 'work'
  workdir.mkdir()
  nb = _read()
  client = NotebookClient(nb, km=_kernel_manager(tmp_path, env), timeout=600,
                          allow_errors=False, resources={'metadata': {'path': str(workdir)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  assert not _outputs(nb, 'error')
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.execution_count is not None, cell.source[:80]
  stdout = ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')

  assert 'is already installed' in stdout  # nothing was pip-installed
  assert 'QUICK=True' in stdout
  assert re.search(r'^5 steps in', stdout, re.M), stdout
  match = re.search(r'bits/dim on 2 test digits: (\S+)', stdout)
  assert match, stdout
  bpd = float(match.group(1))
  assert math.isfinite(bpd) and 0 < bpd < 20, bpd
  assert f'CIFAR-10 U-Net: {CIFAR10_PARAMS} parameters' in stdout

  # One figure each: digits, forward strip, schedules, loss, samples, bits/dim terms.
  images = [o for o in _outputs(nb, 'display_data') if 'image/png' in o.data]
  assert len(images) == 6, len(images)
  assert (tmp_path / 'data' / 'digits').is_dir()
