"""Batches placed on the devices ahead of the step that needs them.

    batches = DevicePrefetcher(train_iter, NamedSharding(mesh, P('data')), ahead=2)
    for step in ...:
      state, metrics = update(state, next(batches))   # batch k+1 .. k+2 are already placed

`next()` hands out batch k and, before returning, has placed batches k+1 … k+ahead on the
devices (`jax.make_array_from_process_local_data`: this process's share of each global
batch). JAX dispatches the step asynchronously, so the host reads and places the following
batch while the device computes: the loop's host work overlaps the step instead of preceding
it.

Checkpoints must record the batches the steps consumed, not those read ahead:
`get_state()` is the wrapped iterator's state as it was right after the batch last handed
out (JSON bytes, which grain's orbax handler writes as it is). Restore into the wrapped
iterator before wrapping it.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterator

import jax
import numpy as np


def _state_bytes(iterator) -> bytes:
  state = iterator.get_state()
  if isinstance(state, bytes):
    return state
  return json.dumps(state).encode()


class DevicePrefetcher:
  """Iterates global `jax.Array` batches of a host iterator's local batches, `ahead` placed
  before they are asked for (module docstring)."""

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]],
               sharding: jax.sharding.Sharding, *, ahead: int = 2):
    if ahead < 0:
      raise ValueError(f'ahead must be >= 0, got {ahead}')
    self._iterator = iterator
    self._sharding = sharding
    self._ahead = int(ahead)
    # Placed batches with the wrapped iterator's state right after each was read.
    self._queue: collections.deque[tuple[Any, bytes]] = collections.deque()
    self._state = _state_bytes(iterator)   # as of the last batch handed out
    self.placed = 0                        # batches placed on the devices so far

  def _place_one(self) -> None:
    local = next(self._iterator)
    batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, x), local)
    self._queue.append((batch, _state_bytes(self._iterator)))
    self.placed += 1

  def __iter__(self) -> 'DevicePrefetcher':
    return self

  def __next__(self):
    if not self._queue:
      self._place_one()
    batch, self._state = self._queue.popleft()
    while len(self._queue) < self._ahead:
      self._place_one()
    return batch

  @property
  def queued(self) -> list[Any]:
    """The batches already placed and not yet handed out, oldest first."""
    return [b for b, _ in self._queue]

  def get_state(self) -> bytes:
    """The wrapped iterator's state after the last batch handed out (JSON bytes)."""
    return self._state

  def snapshot(self) -> 'IteratorState':
    """The position as a fixed value, for a checkpoint written in the background while the
    loop reads on."""
    return IteratorState(self._state)


class Stacked:
  """`k` consecutive batches of a host iterator stacked into one, [k, b, ...] (for a train
  step that runs k steps per call). `get_state()` is the wrapped iterator's, so a checkpoint
  taken between stacks records the last batch consumed; restore into the wrapped iterator."""

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]], k: int):
    self._iterator = iterator
    self._k = int(k)

  def __iter__(self) -> 'Stacked':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(self._iterator) for _ in range(self._k)]
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)

  def get_state(self):
    return self._iterator.get_state()


class IteratorState:
  """A data position frozen at one step, in the form grain's orbax handler saves."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state
