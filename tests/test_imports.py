"""The module graph. The package's folders are layers (LAYERS below): a module imports only from
its own folder and the layers below it, so there is no import cycle between folders; none within
them either. The mathematics imports no IO; sampling and evaluation never load the training code
(each checked in a fresh process); new modules land in a folder, not at the package's root."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'diffusion_jax'

# The layers, top to bottom. A module imports only from its own folder (or root module) and from
# the layers below it; the folders of one layer are independent of each other. README, "Layout".
LAYERS = [
    ('tools/',),                # converters: the Inception weights, the diffusers checkpoints
    ('training/',),             # the trainer: loop, step, state, timestep_sampler
    ('evaluation/',),           # FID/IS/precision-recall, bits/dim of a workdir: evaluate, features
    ('trained_model.py',),      # a workdir loaded for sampling (spec + EMA only)
    ('storage/',),              # files: paths, checkpointing, workdir (reads the spec), images
    ('spec.py',),               # ExperimentSpec, OptimizerConfig: a run, built once from a config
    ('sampling/',),             # the samplers and ODE/SDE solvers, likelihood; SamplerConfig; flags
    ('models/', 'data/'),       # the networks; the datasets and the input pipeline
    ('process/', 'runtime/'),   # the DDPM/SDE mathematics; CLI, compilation, devices, signals
    ('options.py',),            # the Option enum every string option derives from
]
ROOT_MODULES = {'__init__', 'options', 'spec', 'trained_model'}  # the rest lives in a folder


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


PATHS = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}
MODULES = sorted(PATHS)


def _import_lines(path: pathlib.Path) -> list[tuple[str, int]]:
  """(module, line) for each of the package's modules that `path` imports, at module level or
  inside functions."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod.
      subs = [f'{node.module}.{a.name}' for a in node.names]
      names = [n for n in subs if n in MODULES] or [node.module]
    else:
      continue
    found.extend((n, node.lineno) for n in names if n in MODULES)
  return sorted(set(found), key=lambda x: (x[1], x[0]))


def _imports(path: pathlib.Path) -> set[str]:
  """The package's modules that `path` imports, at module level or inside functions."""
  return {n for n, _ in _import_lines(path)}


def _where(module: str, imported: str) -> str:
  """`path:line imports module` for the first line of `module` that imports `imported`."""
  line = min(l for n, l in _import_lines(PATHS[module]) if n == imported)
  return f'{PATHS[module].relative_to(ROOT)}:{line} imports {imported}'


def _node(module: str) -> str:
  """The layer node of a module: its folder ('sampling/') or, at the root, its file ('spec.py')."""
  parts = module.split('.')
  if len(parts) == 1:
    return '__init__.py'
  return parts[1] + ('/' if (PACKAGE / parts[1]).is_dir() else '.py')


# The package's own __init__ re-exports the mathematics (every module loads it); an import of
# `diffusion_jax` itself counts as one of what it re-exports.
REEXPORTED = _imports(PATHS['diffusion_jax'])
GRAPH = {m: set().union(*[REEXPORTED if n == 'diffusion_jax' else {n} for n in _imports(p)])
            - {m} for m, p in PATHS.items() if m != 'diffusion_jax'}
LEVEL = {node: i for i, layer in enumerate(LAYERS) for node in layer}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}

  def visit(m, stack):
    state[m] = 'open'
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 'open':
        return stack[stack.index(n):] + [n]
      if n not in state:
        cycle = visit(n, stack + [n])
        if cycle:
          return cycle
    state[m] = 'done'
    return None

  for m in sorted(graph):
    if m not in state:
      cycle = visit(m, [m])
      if cycle:
        return cycle
  return None


def test_the_package_has_no_import_cycle():
  assert 'diffusion_jax.training.loop' in GRAPH and GRAPH['diffusion_jax.trained_model']
  cycle = _find_cycle(GRAPH)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_folders_have_no_import_cycle():
  """Each folder, and each root module, as one node."""
  edges = {}
  for m, imported in GRAPH.items():
    for n in imported:
      if _node(n) != _node(m):
        edges.setdefault((_node(m), _node(n)), _where(m, n))
  graph = {}
  for a, b in edges:
    graph.setdefault(a, set()).add(b)
  cycle = _find_cycle(graph)
  assert cycle is None, ('import cycle between folders: ' + ' -> '.join(cycle) + '\n  ' +
                         '\n  '.join(edges[a, b] for a, b in zip(cycle, cycle[1:])))


def test_no_relative_imports():
  """The package imports itself by absolute names, which the graph above reads."""
  wrong = [f'{p.relative_to(ROOT)}:{node.lineno}' for p in PATHS.values()
           for node in ast.walk(ast.parse(p.read_text()))
           if isinstance(node, ast.ImportFrom) and node.level]
  assert not wrong, f'relative imports: {wrong}'


def test_the_layout_is_the_layers():
  """Every folder and root module of the package is in LAYERS, once; new modules go in a folder."""
  nodes = [node for layer in LAYERS for node in layer]
  assert len(nodes) == len(set(nodes)), f'LAYERS names a node twice: {nodes}'
  root = {p.stem for p in PACKAGE.glob('*.py')}
  assert root <= ROOT_MODULES, (f'modules directly under diffusion_jax/: '
                                f'{sorted(root - ROOT_MODULES)}; put each in the folder of its '
                                'layer (LAYERS)')
  folders = {p.parent for p in PACKAGE.rglob('*.py')} - {PACKAGE}
  assert all((f / '__init__.py').exists() for f in folders), 'a folder without __init__.py'
  assert all(f.parent == PACKAGE for f in folders), f'nested folders: {sorted(folders)}'
  actual = {_node(m) for m in GRAPH}
  assert actual == set(nodes), (f'not in LAYERS: {sorted(actual - set(nodes))}; '
                                f'in LAYERS but not in the package: {sorted(set(nodes) - actual)}')


def test_each_module_imports_only_its_folder_and_the_layers_below():
  wrong = []
  for m in sorted(GRAPH):
    for n in sorted(GRAPH[m]):
      a, b = _node(m), _node(n)
      if a not in LEVEL or b not in LEVEL:
        wrong.append(f'{_where(m, n)}: {a if a not in LEVEL else b} is not in LAYERS')
      elif a != b and LEVEL[b] <= LEVEL[a]:
        how = 'beside' if LEVEL[b] == LEVEL[a] else 'above'
        wrong.append(f'{_where(m, n)}: {b} (layer {LEVEL[b]}) is {how} {a} '
                     f'(layer {LEVEL[a]})')
  order = ' > '.join(f'{i} {" ".join(layer)}' for i, layer in enumerate(LAYERS))
  assert not wrong, ('imports against the layers; a module imports only its own folder and the '
                     f'layers below it (LAYERS, top to bottom: {order}):\n  ' + '\n  '.join(wrong))


INFERENCE = ['diffusion_jax.trained_model', 'diffusion_jax.sampling.sampler',
             'diffusion_jax.sampling.config', 'diffusion_jax.sampling.flags',
             'diffusion_jax.evaluation.evaluate', 'diffusion_jax.evaluation.features',
             'diffusion_jax.spec', 'diffusion_jax.storage.workdir']
ENTRY_POINTS = ['sample.py', 'evaluate.py']  # the inference entry points at the repo root
# The mathematics: pure JAX, no IO.
MATH = sorted([m for m in MODULES if m.startswith('diffusion_jax.process.')] +
              ['diffusion_jax.sampling.solvers', 'diffusion_jax.sampling.likelihood',
               'diffusion_jax.training.timestep_sampler', 'diffusion_jax.options'])
IO = {'orbax', 'tensorflow_datasets', 'grain', 'PIL', 'tensorboardX', 'ml_collections'}


def test_the_mathematics_imports_only_the_mathematics():
  """Even inside functions: of the package only the math modules, and none of the IO libraries."""
  assert set(MATH) <= set(GRAPH), f'MATH names no module: {sorted(set(MATH) - set(GRAPH))}'
  wrong = [_where(m, n) for m in MATH for n in sorted(GRAPH[m]) if n not in MATH]
  wrong += [f'{PATHS[m].relative_to(ROOT)} imports {n}' for m in MATH
            for n in sorted(_imported_names(PATHS[m])) if n.split('.')[0] in IO]
  assert not wrong, 'the math modules import more than the math:\n  ' + '\n  '.join(wrong)


def test_the_package_reexports_only_sampling_and_below():
  """Every module loads diffusion_jax/__init__.py: it re-exports nothing from spec.py up."""
  above = sorted(m for m in REEXPORTED if LEVEL.get(_node(m), -1) < LEVEL['sampling/'])
  assert not above, f'diffusion_jax/__init__.py re-exports {above}, above sampling/ (LAYERS)'


def test_inference_never_imports_the_trainer():
  """Even inside functions: nothing of sampling/, evaluation/ or the inference entry points
  imports training/ (the layers say so for the package; this also covers the entry points)."""
  inference = {m for m in GRAPH if _node(m) in ('sampling/', 'evaluation/')}
  wrong = [_where(m, n) for m in sorted(inference) for n in sorted(GRAPH[m])
           if _node(n) == 'training/']
  wrong += [f'{e} imports {n}' for e in ENTRY_POINTS for n in sorted(_imported_names(ROOT / e))
            if n.startswith('diffusion_jax.training')]
  assert not wrong, 'inference imports the trainer:\n  ' + '\n  '.join(wrong)


def _loaded_by(modules: str) -> set[str]:
  code = f'import sys, {modules}; print(" ".join(sorted(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu'),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return set(out.stdout.split())


@pytest.mark.parametrize('module', INFERENCE)
@pytest.mark.slow
def test_sampling_and_evaluation_never_load_the_trainer(module):
  loaded = _loaded_by(module)
  assert module in loaded
  training = sorted(m for m in loaded if m.startswith('diffusion_jax.training'))
  assert not training, f'{module} loads {training}'


@pytest.mark.slow
def test_math_modules_load_no_io():
  loaded = _loaded_by(', '.join(MATH))  # one process: what the math needs, together
  io = {m.split('.')[0] for m in loaded} & IO
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
