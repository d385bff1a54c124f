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


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises a one-line ValueError when checkpoint `step` holds another model's parameters."""
  path = os.path.join(str(manager.directory), str(step), 'state')
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
  have, want = _param_shapes(saved['params']), _param_shapes(abstract_state.params)
  where = f'checkpoint {step} in {manager.directory}'
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      raise ValueError(
          f'{where} holds parameter {name} with shape {have.get(name)} but this config needs '
          f'{want.get(name)}: it was written for another model shape; use a new --workdir')


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
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f'checkpoint {step} in {manager.directory} does not fit this config\'s training state '
        f'(optimizer or timestep-sampler settings changed?): {first_line} Use the original '
        'config or a new --workdir') from e
  return restored['state']


def abstract_like(state: Any, sharding) -> Any:
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)
