"""String options, resolved once: enums whose members parse from their string values."""

from __future__ import annotations

import enum
from typing import Any


class Option(enum.Enum):
  """An enum whose members are parsed from their string values (`MeanType.parse('eps')`);
  an unknown value is a one-line ValueError naming it and the allowed ones. Subclasses name
  themselves in that message by overriding `_what`."""

  @classmethod
  def parse(cls, value: Any):
    if isinstance(value, cls):
      return value
    for member in cls:
      if member.value == value:
        return member
    allowed = ', '.join(repr(m.value) for m in cls)
    raise ValueError(f'unknown {cls._what()} {value!r}; allowed: {allowed}')

  @classmethod
  def _what(cls) -> str:
    return cls.__name__
