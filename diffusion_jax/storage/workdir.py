"""A training workdir on any filesystem `etils.epath` reaches (a local folder, `gs://...`).

    WORKDIR/
      spec.json            the ExperimentSpec (spec.py): what sampling and evaluation read
      config.json          the config it was built from
      spec_changes.jsonl   one line per resume that changed a field allowed to change
      checkpoints/<step>/  orbax: state (params, optimizer, step, rng), ema, data (iterator)
      samples/ tensorboard/ eval.json samples_<sampler>_<steps>/

Paths enter as strings or `os.PathLike` and are turned into `epath.Path` once, where they
enter (`paths.as_path`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
from etils import epath

from diffusion_jax.storage import checkpointing
from diffusion_jax import spec as spec_lib
from diffusion_jax.storage.paths import as_path, write_text_atomic

SPEC = 'spec.json'
CONFIG = 'config.json'
SPEC_CHANGES = 'spec_changes.jsonl'


class SpecMismatchError(ValueError):
  """The config asks for another model or objective than the one a workdir was trained for."""


checkpoint_dir = checkpointing.checkpoint_dir


def write_json(path: epath.Path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def read_spec(workdir: str | os.PathLike[str]) -> spec_lib.ExperimentSpec:
  """The spec of a training workdir; FileNotFoundError when `workdir` is not one."""
  path = as_path(workdir) / SPEC
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: --workdir must be a training workdir '
                            '(python train.py --workdir ...)')
  try:
    return spec_lib.ExperimentSpec.from_json(read_json(path))
  except (ValueError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} cannot be read: {" ".join(str(e).split())}') from None


def check_dataset(workdir: str | os.PathLike[str], dataset: str) -> None:
  """Refuses, before any data is read, a config whose dataset is not the workdir's."""
  path = as_path(workdir) / SPEC
  if not path.exists():
    return
  try:
    stored = read_json(path)['data']['dataset']
  except (OSError, json.JSONDecodeError, KeyError, TypeError):
    return  # check_resume reports an unreadable spec
  if stored != dataset:
    raise SpecMismatchError(
        f'{as_path(workdir)} was trained for another model or objective; changed: '
        f'data.dataset {stored!r} -> {dataset!r}. Use the original config or a new --workdir '
        '(nothing in the workdir was changed)')


def check_resume(workdir: str | os.PathLike[str], new: spec_lib.ExperimentSpec
                 ) -> list[tuple[str, Any, Any]] | None:
  """Compares `new` with the spec stored in `workdir`, writing nothing.

  Returns None for a fresh workdir, else the fields that changed and may change on resume.
  Raises `SpecMismatchError` (one line naming each field, its old and its new value) when a
  field that defines the model or the objective differs.
  """
  path = as_path(workdir) / SPEC
  if not path.exists():
    if (as_path(workdir) / 'checkpoints').exists():
      raise SpecMismatchError(f'{as_path(workdir)} holds checkpoints but no {SPEC} (written by '
                              'an older version of diffusion_jax?): use a new --workdir')
    return None
  try:
    stored = read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} cannot be read ({type(e).__name__}); it was left as it is') from None
  fixed, resumable = spec_lib.differences(stored, new)
  if fixed:
    raise SpecMismatchError(
        f'{as_path(workdir)} was trained for another model or objective; changed: '
        f'{spec_lib.describe_differences(fixed)}. Use the original config or a new --workdir '
        '(nothing in the workdir was changed)')
  return resumable


def record_start(workdir: str | os.PathLike[str], new: spec_lib.ExperimentSpec,
                 config: ml_collections.ConfigDict, changes: list | None, step: int) -> None:
  """Writes spec.json and config.json at the first start; on a resume that changed resumable
  fields, rewrites them and appends the changes to spec_changes.jsonl. (Process 0 only.)"""
  wd = as_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  first = not (wd / SPEC).exists()
  if first or changes:
    write_json(wd / SPEC, new.to_json())
    write_text_atomic(wd / CONFIG, config.to_json(indent=2) + '\n')
  if changes:
    line = json.dumps(dict(time=time.strftime('%Y-%m-%dT%H:%M:%S%z'), resumed_at_step=step,
                           changes={n: [old, new_] for n, old, new_ in changes}),
                      sort_keys=True)
    log = wd / SPEC_CHANGES
    previous = log.read_text() if log.exists() else ''
    write_text_atomic(log, previous + line + '\n')
