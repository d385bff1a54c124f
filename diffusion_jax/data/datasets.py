"""What the library knows about each dataset beyond its TFDS metadata, in one table.

    describe('digits')    # prepared locally on first use; scored with the digits classifier
    describe('cifar10')   # any other TFDS name: prepared by the user; scored with Inception

The trainer, the input pipeline and the evaluator ask this description instead of comparing
dataset names; a new locally-built dataset is one entry in `_KNOWN`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from diffusion_jax.data import digits
from diffusion_jax.options import Option


class FeatureKind(Option):
  """The network whose features FID, IS and precision/recall are computed on."""
  DIGITS = 'digits'        # the project's digits classifier (trained and cached locally)
  INCEPTION = 'inception'  # the FID Inception-v3 (weights supplied by the user)

  @classmethod
  def _what(cls):
    return 'features'


@dataclasses.dataclass(frozen=True)
class DatasetDescription:
  """name: the TFDS name. prepare: builds the dataset in a data_dir from files already on this
  machine (None: the user prepares it with `tfds build`). features: the default feature
  network for sample metrics."""
  name: str
  prepare: Callable[[str | os.PathLike[str] | None], None] | None = None
  features: FeatureKind = FeatureKind.INCEPTION

  @property
  def prepared_locally(self) -> bool:
    return self.prepare is not None


_KNOWN = {
    digits.NAME: DatasetDescription(digits.NAME, prepare=digits.prepare_digits,
                                    features=FeatureKind.DIGITS),
}


def describe(name: str) -> DatasetDescription:
  """The description of TFDS dataset `name` (a default one for names not listed here)."""
  return _KNOWN.get(name) or DatasetDescription(name)
