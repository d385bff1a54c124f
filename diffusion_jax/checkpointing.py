"""Checkpoints of the training state and the input position, with orbax.

`workdir/checkpoints/<step>/` holds two items: `state` (the whole `TrainState`: params,
optimizer state, EMA params, step, rng) and `data` (the grain iterator's position, one file
per process). Saves are asynchronous; the last `keep` are kept. All processes call every
function here: orbax writes collectively.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None) -> None:
  """Starts saving `state` (and the iterator's position) as checkpoint `step`."""
  items = dict(state=ocp.args.StandardSave(state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises a one-line ValueError when checkpoint `step` holds another model's shapes."""
  try:
    saved = manager.item_metadata(step)['state']
  except Exception:  # pylint: disable=broad-except  # metadata is optional; restore will tell.
    return
  if saved is None:
    return
  want, have = _shapes(abstract_state), _shapes(saved)
  # The saved metadata is a nested dict; compare on the leaves that both trees name.
  have_by_leaf = {k.replace("'", ''): v for k, v in have.items()}
  for path, shape in want.items():
    key = path.replace("'", '').replace('.', '')
    match = next((v for k, v in have_by_leaf.items()
                  if k.replace('.', '').replace("'", '') == key), None)
    if match is None:
      raise ValueError(f'checkpoint {step} in {manager.directory} has no entry {path}: it was '
                       'written for another model or config; use a new --workdir')
    if tuple(match) != tuple(shape):
      raise ValueError(f'checkpoint {step} in {manager.directory} holds {path} with shape '
                       f'{tuple(match)} but this config needs {tuple(shape)}: it was written '
                       'for another model shape; use a new --workdir')
  if len(have) != len(want):
    raise ValueError(f'checkpoint {step} in {manager.directory} holds {len(have)} arrays but '
                     f'this config needs {len(want)}: it was written for another model or '
                     'config; use a new --workdir')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator=None) -> Any:
  """Restores checkpoint `step` into the shapes and shardings of `abstract_state`.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings. The data iterator,
  if given, is moved in place to the saved position.
  """
  check_compatible(manager, step, abstract_state)
  items = dict(state=ocp.args.StandardRestore(abstract_state))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def abstract_like(state: Any, sharding) -> Any:
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)
