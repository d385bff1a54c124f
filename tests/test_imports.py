"""The module graph: no import cycles, math modules free of IO, and sampling and evaluation
that never load the training code (each module imported in a fresh process)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'diffusion_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob('*.py'))


def _imports(path: pathlib.Path) -> set[str]:
  """The package's modules that `path` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod.
      subs = [f'{node.module}.{a.name}' for a in node.names]
      names = [n for n in subs if n in MODULES] or [node.module]
    else:
      continue
    found.update(n for n in names if n in MODULES)
  return found


def test_the_package_has_no_import_cycle():
  graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob('*.py')}
  assert 'diffusion_jax.training.loop' in graph and graph['diffusion_jax.trained_model']
  state = {}

  def visit(m, stack):
    state[m] = 'open'
    for n in sorted(graph.get(m, ())):
      if n == 'diffusion_jax':
        continue  # the package's __init__ re-exports the math; every module loads it
      if state.get(n) == 'open':
        cycle = stack[stack.index(n):] + [n]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def _loaded_by(modules: str) -> set[str]:
  code = f'import sys, {modules}; print(" ".join(sorted(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu'),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return set(out.stdout.split())


INFERENCE = ['diffusion_jax.trained_model', 'diffusion_jax.sampling', 'diffusion_jax.evaluation.evaluate',
             'diffusion_jax.spec', 'diffusion_jax.storage.workdir', 'diffusion_jax.evaluation.features']
MATH = ['diffusion_jax.process.gaussian_diffusion', 'diffusion_jax.process.schedules', 'diffusion_jax.sampling.samplers',
        'diffusion_jax.training.timestep_sampler', 'diffusion_jax.process.continuous', 'diffusion_jax.sampling.solvers',
        'diffusion_jax.process.score_matching',
        'diffusion_jax.sampling.likelihood', 'diffusion_jax.options']


@pytest.mark.parametrize('module', INFERENCE)
@pytest.mark.slow
def test_sampling_and_evaluation_never_load_the_trainer(module):
  loaded = _loaded_by(module)
  assert module in loaded
  assert 'diffusion_jax.training.loop' not in loaded and 'diffusion_jax.training.step' not in loaded


@pytest.mark.slow
def test_math_modules_load_no_io():
  loaded = _loaded_by(', '.join(MATH))  # one process: what the math needs, together
  io = {m.split('.')[0] for m in loaded} & {'orbax', 'tensorflow_datasets', 'grain', 'PIL',
                                            'tensorboardX', 'ml_collections'}
  assert set(MATH) <= loaded and not io, f'the math modules load {sorted(io)}'


# ------------------------------------------------------------------------------------------
# The test suite's own modules.
# ------------------------------------------------------------------------------------------

TESTS = ROOT / 'tests'
PURE = ('oracles.py', 'numpy_reference.py')  # the independent math: nothing of diffusion_jax


def _imported_names(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at module level or inside functions, dotted in full
  (`from tests import x` and relative imports also give the module x)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ''
      found.add(module)
      if node.level or module == 'tests':  # `from . import x`, `from tests import x`: modules
        found.update(f'{module}.{a.name}'.strip('.') for a in node.names)
  return found


def _is_test_module(name: str) -> bool:
  return any(part.startswith('test_') for part in name.split('.'))


def test_no_test_module_imports_another():
  """What test modules share lives in tests/oracles.py (pure math), tests/helpers.py (what
  needs diffusion_jax, devices or child processes) or a fixture of tests/conftest.py. A test
  module imported by another is collected under one name and loaded under another, and its
  helpers drift into copies."""
  found = {p.name: sorted(n for n in _imported_names(p) if _is_test_module(n))
           for p in sorted(TESTS.glob('*.py'))}
  found = {k: v for k, v in found.items() if v}
  assert not found, f'test modules imported by other modules: {found}'


@pytest.mark.parametrize('name', PURE)
def test_the_independent_math_imports_nothing_of_the_package(name):
  imported = {n.split('.')[0] for n in _imported_names(TESTS / name)}
  assert 'diffusion_jax' not in imported and not any(_is_test_module(n) for n in imported)
