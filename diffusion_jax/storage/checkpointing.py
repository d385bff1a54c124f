"""Checkpoints of the training state and the input position, with orbax.

`WORKDIR/checkpoints/<step>/` holds three items:
  * `state`: the `TrainState` without its EMA parameters (params, optimizer state, step, rng,
    the timestep sampler's history);
  * `ema`: the EMA parameters, on their own, so that sampling and evaluation restore just
    them (`restore_ema`) without building an optimizer;
  * `data`: the grain iterator's position, one file per process.
An imported model (tools/diffusers_checkpoint.py) has an EMA-only checkpoint, written by
`save_ema_only` and marked so in its metadata: readers restore it as any other; a trainer
refuses to resume it. Saves are asynchronous; the last `keep` are kept. All processes call every function here:
orbax writes collectively. Directories are `epath.Path`s (local or gs://).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from diffusion_jax.runtime import faults
from diffusion_jax.storage import paths

ITEMS = ('state', 'ema', 'data')


def checkpoint_dir(workdir) -> epath.Path:
  """WORKDIR/checkpoints (local or remote)."""
  return paths.as_path(workdir) / 'checkpoints'


def make_manager(directory: epath.Path, *, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager of the checkpoints in `directory` (`checkpoint_dir(WORKDIR)`).

  `read_only`: for sampling and evaluation, which never save: nothing is created or pruned.
  It is not orbax's `read_only` option, which logs three warnings at every construction.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
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
  faults.at(faults.Point.SAVE_STARTED, step)


def item_metadata(path: epath.Path) -> Any:
  """The array metadata tree of one item folder (`<step>/ema`), read by the item's handler.

  Not through a `Checkpointer`: that treats the folder as a whole checkpoint and looks for
  the step's `_CHECKPOINT_METADATA` inside it (orbax keeps it one level up, in `<step>/`),
  warning "Metadata file does not exist" for every checkpoint the trainer wrote.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(path)
  finally:
    handler.close()


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> None:
  """Raises a one-line ValueError when checkpoint `step` holds another model's parameters."""
  saved = item_metadata(epath.Path(manager.directory) / str(step) / 'ema')
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


EMA_ONLY = 'ema_only'  # the custom-metadata key that marks an EMA-only checkpoint


def save_ema_only(workdir, step: int, ema_params: Any, source: str) -> None:
  """Writes checkpoint `step` of `workdir` with the `ema` item alone (an imported model has
  no optimizer state or data position), marked `ema_only` in its metadata with `source`
  (where the parameters came from), and waits until it is written."""
  manager = make_manager(checkpoint_dir(workdir), keep=None, async_save=False)
  try:
    manager.save(step, args=ocp.args.Composite(ema=ocp.args.StandardSave(ema_params)),
                 custom_metadata={EMA_ONLY: True, 'source': source}, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def is_ema_only(workdir, step: int) -> bool:
  """True when checkpoint `step` was written by `save_ema_only` (False when unreadable)."""
  path = checkpoint_dir(workdir) / str(step) / '_CHECKPOINT_METADATA'
  try:
    custom = json.loads(path.read_text()).get('custom_metadata') or {}
  except (OSError, ValueError, AttributeError):
    return False
  return custom.get(EMA_ONLY) is True


def abstract_like(state: Any, sharding) -> Any:
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)


# ------------------------------------------------------------------------------------------
# The latest good checkpoint: one rule for train, sample and evaluate.
# ------------------------------------------------------------------------------------------
#
# A checkpoint is `checkpoints/<digits>/`: orbax writes into `<step>.orbax-checkpoint-tmp-*`
# and renames it when finished, so temporary folders are never candidates. The latest good
# checkpoint is the newest candidate that restores. A candidate that does not (missing or
# unparsable metadata, a truncated array or data-iterator file) is skipped with one warning
# line naming its step and the reason; it is never deleted. A trainer moves it to
# `WORKDIR/set_aside_checkpoints/<step>` (a new save of that step would otherwise collide with
# it, and orbax's max_to_keep would later delete it); readers leave it where it is.
# A candidate whose metadata reads but whose tree does not fit the config is not damaged: that
# stays the one-line "another model / does not fit" error.

SET_ASIDE = 'set_aside_checkpoints'


class UnreadableCheckpointError(Exception):
  """Checkpoint `step` cannot be read (damaged or incomplete); `reason` is one line."""

  def __init__(self, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f'checkpoint {step}: {reason}')


class NoReadableCheckpointError(FileNotFoundError):
  """Checkpoints exist but none of them can be read."""


class CheckpointWriteError(OSError):
  """A save failed (full disk, no permission, ...); one line naming the path."""


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  text = text if len(text) <= 300 else text[:297] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def candidate_steps(workdir) -> list[int]:
  """Finished checkpoint steps of `workdir` (folders named by digits only), newest first."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                reverse=True)


def check_metadata(workdir, step: int, *, need_state: bool = True) -> Any:
  """Reads the metadata of checkpoint `step`; raises UnreadableCheckpointError if it cannot.

  Returns the saved state's metadata tree (shapes and dtypes, no arrays read); for an
  EMA-only checkpoint (`save_ema_only`), which readers (`need_state=False`) accept, the EMA
  parameters'. With `need_state` (a trainer's resume) an EMA-only checkpoint is a one-line
  ValueError, not damage: it is neither skipped nor set aside.
  """
  step_dir = checkpoint_dir(workdir) / str(step)
  if paths.is_remote(step_dir) and not (step_dir / 'commit_success.txt').exists():
    # On buckets orbax writes in place and marks a finished step with this file.
    raise UnreadableCheckpointError(step, 'unfinished (no commit_success.txt)')
  ema_only = is_ema_only(workdir, step)
  if ema_only and need_state:
    raise ValueError(
        f'checkpoint {step} in {checkpoint_dir(workdir)} holds only EMA parameters (an '
        'imported model): it samples and evaluates, but training cannot resume from it; '
        'use a new --workdir')
  item = 'ema' if ema_only else 'state'
  names = ('_CHECKPOINT_METADATA', 'ema/_METADATA') + (() if ema_only else ('state/_METADATA',))
  for name in names:
    path = step_dir / name
    if not path.exists():
      raise UnreadableCheckpointError(step, f'{name} is missing')
    try:
      json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UnreadableCheckpointError(step, f'{name} is unreadable ({_one_line(e)})') from e
  for path in sorted((step_dir / 'data').glob('process_*.json')):
    try:
      json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UnreadableCheckpointError(
          step, f'data/{path.name} (the input position) is unreadable ({_one_line(e)})') from e
  try:
    saved = item_metadata(step_dir / item)
    if saved is None:
      raise ValueError('no item metadata')
    return saved
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableCheckpointError(step, f'{item} metadata unreadable ({_one_line(e)})') from e


def _agree(ok: bool) -> bool:
  """True on every process when `ok` is True on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def set_aside(workdir, step: int, reason: str) -> epath.Path:
  """Moves checkpoint `step` to WORKDIR/set_aside_checkpoints/<step>[.n] (process 0 moves;
  call it on every process). Returns the new path."""
  src = checkpoint_dir(workdir) / str(step)
  dst_dir = paths.as_path(workdir) / SET_ASIDE
  dst, n = dst_dir / str(step), 1
  while dst.exists():
    dst, n = dst_dir / f'{step}.{n}', n + 1
  if jax.process_index() == 0:
    dst_dir.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    (dst_dir / f'{dst.name}.reason.txt').write_text(reason + '\n')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  return dst


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any,
                        data_iterator=None, *, step: int | None = None,
                        at_most: int | None = None, move_aside: bool = False,
                        restore_fn: Callable[[int], Any] | None = None
                        ) -> tuple[int | None, Any]:
  """Restores the newest checkpoint that reads (or checkpoint `step`, with no fallback; or the
  newest readable one not after `at_most`).

  `restore_fn(step)` replaces the whole-state `restore` (readers pass `restore_ema`).
  Returns (step, state), or (None, None) when the workdir has no checkpoint at all. Damaged
  ones are skipped with one warning line each (and moved aside if `move_aside`: trainers
  only). Raises NoReadableCheckpointError when there are checkpoints but none reads, and
  the one-line ValueError of `restore` when one reads but was written for another config.
  """
  workdir = epath.Path(manager.directory).parent
  steps = candidate_steps(workdir)
  if step is not None:
    steps = [s for s in steps if s == step]
    if not steps:
      raise FileNotFoundError(f'no checkpoint {step} in {manager.directory}')
  if at_most is not None:
    steps = [s for s in steps if s <= at_most]
  skipped = []
  for s in steps:
    try:
      try:
        check_metadata(workdir, s, need_state=restore_fn is None)
        failure = None
      except UnreadableCheckpointError as e:
        failure = e
      if not _agree(failure is None):
        raise failure or UnreadableCheckpointError(s, 'metadata unreadable on another process')
      try:
        state = (restore_fn(s) if restore_fn is not None
                 else restore(manager, s, abstract_state, data_iterator))
      except Exception as e:  # pylint: disable=broad-except
        if _is_config_mismatch(e):
          raise   # the one-line "another model" / "does not fit" error: not damage
        failure = UnreadableCheckpointError(s, f'restore failed ({_one_line(_root(e))})')
      if not _agree(failure is None):
        raise failure or UnreadableCheckpointError(s, 'restore failed on another process')
      if skipped and move_aside:
        manager.reload()
      return s, state
    except UnreadableCheckpointError as e:
      where = ''
      if move_aside:
        where = f'; moved to {set_aside(workdir, s, e.reason)}'
      logging.warning('Skipping checkpoint %d in %s: %s%s', s, manager.directory, e.reason,
                      where)
      skipped.append(s)
  if skipped and move_aside:
    manager.reload()
  if skipped:
    raise NoReadableCheckpointError(
        f'no readable checkpoint in {manager.directory}: {", ".join(map(str, skipped))} '
        'could not be read (see the warnings); start a new --workdir or restore a backup')
  return None, None


def latest_good_step(workdir, step: int | None = None) -> int:
  """The step a reader (sample, evaluate) should restore, without restoring it: `step` if
  given and its metadata reads, else the newest checkpoint whose metadata reads (the others
  get one warning line each and are left in place). A read failure found only when the
  arrays are restored is handled by `restore_latest_good(..., at_most=step)`.

  Raises FileNotFoundError (no checkpoint, or not `step`) or NoReadableCheckpointError.
  """
  directory = checkpoint_dir(workdir)
  steps = candidate_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train first '
                            '(python train.py --workdir ...)')
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint {step} in {directory}; it has {sorted(steps)}')
    try:
      check_metadata(workdir, step, need_state=False)
    except UnreadableCheckpointError as e:
      raise NoReadableCheckpointError(f'checkpoint {step} in {directory} cannot be read: '
                                      f'{e.reason}') from e
    return step
  for s in steps:
    try:
      check_metadata(workdir, s, need_state=False)
      return s
    except UnreadableCheckpointError as e:
      logging.warning('Skipping checkpoint %d in %s: %s', s, directory, e.reason)
  raise NoReadableCheckpointError(
      f'no readable checkpoint in {directory}: {", ".join(map(str, steps))} could not be read '
      '(see the warnings)')


def _root(e: BaseException) -> BaseException:
  """The innermost cause of `e` (the IO error under orbax's and tensorstore's wrappers)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return e


def _is_config_mismatch(e: BaseException) -> bool:
  """True for `restore`'s errors about a tree that does not fit the config; False for read
  failures (a truncated array file is an OUT_OF_RANGE from tensorstore, a truncated
  data-iterator file a JSONDecodeError, which is a ValueError too)."""
  if not isinstance(e, ValueError):
    return False
  chain, x = [], e
  while x is not None:
    chain.append(x)
    x = x.__cause__ or x.__context__
  if any(isinstance(x, (OSError, json.JSONDecodeError)) for x in chain):
    return False
  if any('Error reading' in str(x) or 'TensorStore' in str(x) for x in chain):
    return False
  return 'another model' in str(e) or 'does not fit' in str(e)


# ------------------------------------------------------------------------------------------
# Saves that fail: one line naming the path.
# ------------------------------------------------------------------------------------------


def save_or_raise(manager: ocp.CheckpointManager, step: int, state: Any,
                  data_iterator=None) -> None:
  """`save`, with failures (including those of the previous asynchronous save, which orbax
  reports here) raised as a one-line CheckpointWriteError."""
  try:
    save(manager, step, state, data_iterator)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointWriteError(_write_failure(manager, step, e)) from e


def wait_or_raise(manager: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous save in flight; a failure becomes a CheckpointWriteError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointWriteError(_write_failure(manager, None, e)) from e


def _write_failure(manager, step, e: BaseException) -> str:
  """'could not write checkpoint N in DIR: <strerror> (<file>)', from the OSError in the chain
  or the OS error code that tensorstore puts in its message."""
  chain, x = [], e
  while x is not None:
    chain.append(x)
    x = x.__cause__ or x.__context__
  reason = None
  for x in chain:
    if isinstance(x, OSError) and x.errno:
      reason = os.strerror(x.errno) + (f' ({x.filename})' if x.filename else '')
      break
  if reason is None:
    for x in chain:
      code = re.search(r"os_error_code='?(\d+)", str(x))
      if code:
        path = re.search(r'(?:writing|Failed writing|Error writing)[^"]*"(/[^"]+)"', str(x))
        reason = os.strerror(int(code.group(1))) + (f' (writing {path.group(1)})' if path else '')
        break
  reason = reason or _one_line(_root(e))
  if step is None:
    for x in chain:
      m = re.search(r'/(\d+)\.orbax-checkpoint-tmp', str(x))
      if m:
        step = int(m.group(1))
        break
  what = f'checkpoint {step}' if step is not None else 'a checkpoint'
  good = candidate_steps(epath.Path(manager.directory).parent)
  kept = (f'; earlier checkpoints ({", ".join(map(str, sorted(good)))}) are untouched'
          if good else '')
  return f'could not write {what} in {manager.directory}: {reason}{kept}'
