"""Paths on any filesystem `etils.epath` reaches (a local folder, `gs://...`), turned into
`epath.Path` once, where they enter: `as_path`. Local relative paths become absolute (orbax
needs that); remote ones are kept as they are."""

from __future__ import annotations

import os
import uuid

from etils import epath


def is_remote(path: str | os.PathLike[str]) -> bool:
  return '://' in os.fspath(path)


def _fresh_gcs_listings() -> None:
  """gcsfs caches directory listings per process, so checkpoints that TensorStore, another
  process or another host wrote would stay invisible to `exists` and `iterdir`: turn the
  cache off (unless the user configured gcsfs otherwise)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def as_path(path: str | os.PathLike[str]) -> epath.Path:
  """`path` as an `epath.Path`: absolute when local, untouched when remote (gs://, s3://)."""
  if isinstance(path, str) and not path:
    raise ValueError('a path must not be empty')
  if is_remote(path):
    if os.fspath(path).startswith('gs://'):
      _fresh_gcs_listings()
    return epath.Path(os.fspath(path))
  return epath.Path(os.fspath(path)).expanduser().absolute()


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` so that a reader never sees half a file: locally through a
  temporary sibling and a rename; an object in a bucket appears whole when written."""
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
  tmp.write_text(text)
  tmp.replace(path)
