"""Checkpoints of the training state and the input position, with orbax.

`WORKDIR/checkpoints/<step>/` holds three items:
  * `state`: the `TrainState` without its EMA parameters (params, optimizer state, step, rng,
    the timestep sampler's history);
  * `ema`: the EMA parameters, on their own, so that sampling and evaluation restore just
    them (`restore_ema`) without building an optimizer;
  * `data`: the grain iterator's position, one file per process.
Saves are asynchronous; the last `keep` are kept. All processes call every function here:
orbax writes collectively. Directories are `epath.Path`s (local or gs://).
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ('state', 'ema', 'data')


def make_manager(directory: epath.Path, *, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager of the checkpoints in `directory` (`workdir.checkpoint_dir(WORKDIR)`)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None) -> None:
  """Starts saving `state` (a TrainState; its EMA params as their own item) and the
  iterator's position as checkpoint `step`."""
  items = dict(state=ocp.args.StandardSave(state.replace(ema_params=None)),
               ema=ocp.args.StandardSave(state.ema_params))
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> None:
  """Raises a one-line ValueError when checkpoint `step` holds another model's parameters."""
  path = epath.Path(manager.directory) / str(step) / 'ema'
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
  have, want = _param_shapes(saved), _param_shapes(abstract_params)
  where = f'checkpoint {step} in {manager.directory}'
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      raise ValueError(
          f'{where} holds parameter {name} with shape {have.get(name)} but this config needs '
          f'{want.get(name)}: it was written for another model shape; use a new --workdir')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator=None) -> Any:
  """Restores checkpoint `step` into the shapes and shardings of `abstract_state`.

  `abstract_state` is a TrainState of `jax.ShapeDtypeStruct`s with shardings. The data
  iterator, if given, is moved in place to the saved position.
  """
  check_compatible(manager, step, abstract_state.ema_params)
  items = dict(state=ocp.args.StandardRestore(abstract_state.replace(ema_params=None)),
               ema=ocp.args.StandardRestore(abstract_state.ema_params))
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
  return restored['state'].replace(ema_params=restored['ema'])


def restore_ema(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Restores only the EMA parameters of checkpoint `step` (nothing of the optimizer)."""
  check_compatible(manager, step, abstract_params)
  restored = manager.restore(step, args=ocp.args.Composite(
      ema=ocp.args.StandardRestore(abstract_params)))
  return restored['ema']


def abstract_like(state: Any, sharding) -> Any:
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)
