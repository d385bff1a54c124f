"""Test helpers: training workdirs written directly in the trainer's format (no compile), and
the train.py command line of the tiny config.

`write_workdir` writes what training leaves after step 2 — spec.json, config.json and
checkpoints/2 (state, ema) — with random NumPy parameters: a second, where a training step's
compile costs a minute on a busy 2-core machine.
"""

import collections
import os
import sys

import jax
import numpy as np

from diffusion_jax.storage import checkpointing
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.spec import ExperimentSpec
from diffusion_jax.training.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(abstract, rng: np.random.Generator):
  """NumPy parameters of the shapes of `abstract`: N(0, 1/fan_in) kernels, unit GroupNorm
  scales, small biases. Building them with the model's own init would cost a compile."""
  def leaf(path, x):
    if path[-1].key == 'scale':
      return np.ones(x.shape, x.dtype)
    if len(x.shape) < 2:
      return (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
    return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def write_workdir(workdir, config, info, seed: int = 0) -> str:
  """A workdir of `config` (on dataset `info`) as training leaves it after step 2."""
  spec = ExperimentSpec.from_config(config, info)
  abstract = jax.eval_shape(lambda: TrainState.create(
      spec.init_params(jax.random.PRNGKey(1)), spec.optimizer.make(), jax.random.PRNGKey(2)))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  rng = np.random.default_rng(seed)
  state = state.replace(params=random_params(abstract.params, rng),
                        ema_params=random_params(abstract.ema_params, rng), step=np.int32(2))
  workdir_lib.record_start(workdir, spec, config, None, 0)
  manager = checkpointing.make_manager(workdir_lib.checkpoint_dir(workdir))
  checkpointing.save(manager, 2, state)
  manager.wait_until_finished()
  manager.close()
  return str(workdir)


def train_cmd(data_dir, workdir, *overrides) -> list[str]:
  """train.py on configs/tiny.py with the digits in `data_dir`."""
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "tiny.py")}', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *overrides]


def restore_checkpoint(workdir, step: int):
  """Checkpoint `step` of `workdir` as host arrays, whatever topology saved it: `(dict(state=,
  ema=), {data file name: its text})`. Tests compare these bit for bit."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  items = {}
  with ocp.StandardCheckpointer() as ckptr:
    for name in ('state', 'ema'):
      meta = ckptr.metadata(os.path.join(path, name)).item_metadata
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            meta)
      items[name] = jax.device_get(ckptr.restore(os.path.join(path, name), target))
  data = {}
  for f in sorted(os.listdir(os.path.join(path, 'data'))):
    if f.startswith('process_'):
      with open(os.path.join(path, 'data', f)) as fh:
        data[f] = fh.read()
  return items, data


def _kind(path, modules) -> str | None:
  """The key just above the model's module names in a leaf's path: 'params', 'ema', Adam's
  'mu' and 'nu'; None for a leaf outside a parameter tree (step, rng, counts)."""
  above = None
  for k in path:
    key = getattr(k, 'key', None)
    if key in modules:
      return above
    above = key
  return None


def _absmax(x: np.ndarray) -> float:
  return float(np.max(np.abs(x), initial=0.0))


def assert_same_checkpoint(want_dir, got_dir, step: int, rtol: float = 0.0,
                           floors: dict[str, float] | None = None) -> None:
  """Every leaf and the iterator position of checkpoint `step` equal: bit for bit by default.

  With `rtol` (for runs that round differently, e.g. another reduction order), each float
  leaf is compared at its own scale, elementwise
      |got − want| ≤ rtol·max|leaf| + floors[kind]·max|kind|,
  max|leaf| the largest magnitude of the leaf in either run and max|kind| that of all the
  leaves of its kind (`_kind`: 'params', 'ema', 'mu', 'nu'; no floor for a kind not named).
  The floor is for leaves whose gradient is zero in exact arithmetic (an attention key's bias,
  a bias ahead of a GroupNorm of one channel per group): they hold float32 rounding noise,
  which two reduction orders do not share. Integer leaves (step, rng, counts) and the
  iterator position stay exact.
  """
  want, want_data = restore_checkpoint(want_dir, step)
  got, got_data = restore_checkpoint(got_dir, step)
  flat_want, tree_want = jax.tree_util.tree_flatten_with_path(want)
  flat_got, tree_got = jax.tree_util.tree_flatten_with_path(got)
  assert tree_want == tree_got
  assert len(flat_want) > 10
  leaves = [(path, np.asarray(a), np.asarray(b))
            for (path, a), (_, b) in zip(flat_want, flat_got)]
  exact = not (rtol or floors)
  floors = dict(floors or {})
  kinds = [None] * len(leaves)
  if not exact:
    modules = set(want['state']['params'])
    kinds = [_kind(path, modules) for path, _, _ in leaves]
    assert set(floors) <= set(kinds), (sorted(floors), sorted(set(kinds) - {None}))
  largest = collections.defaultdict(float)   # max|kind|
  for kind, (_, a, b) in zip(kinds, leaves):
    if kind in floors:
      largest[kind] = max(largest[kind], _absmax(a), _absmax(b))
  for kind, (path, a, b) in zip(kinds, leaves):
    name = jax.tree_util.keystr(path)
    if not exact and np.issubdtype(a.dtype, np.floating):
      atol = rtol * max(_absmax(a), _absmax(b)) + floors.get(kind, 0.0) * largest[kind]
      np.testing.assert_allclose(b, a, rtol=0, atol=atol,
                                 err_msg=f'{name} (kind {kind}, atol {atol:.3g})')
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert int(got['state']['step']) == step
  assert want_data == got_data and want_data
