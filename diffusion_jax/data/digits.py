"""The `digits` TFDS dataset: scikit-learn's 8x8 handwritten digits, built offline.

scikit-learn ships the 1,797 digits of the UCI "Optical Recognition of Handwritten
Digits" test set inside its wheel (`sklearn.datasets.load_digits`), so this
dataset is built without any download. It is small enough to train a DDPM on a
laptop CPU in minutes, which makes it the dataset of the tests and the tiny
configs.

* `image`: uint8 `[8, 8, 1]`. The original gray levels 0..16 are mapped to
  0..255 as `round(v * 255 / 16)` (8 -> 128, 16 -> 255).
* `label`: `ClassLabel(num_classes=10)`, the digit.
* Splits: `np.random.RandomState(SPLIT_SEED).permutation(1797)`; its first
  `NUM_TRAIN` (1,500) indices form `train`, the remaining 297 form `test`.
  Within a split, examples keep scikit-learn's order (sorted by original index).
  `RandomState` is used because NumPy keeps its streams fixed across versions.

The builder writes array_record files, which `tfds.data_source` reads through
grain without TensorFlow; no feature here needs TensorFlow to encode or decode.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

NAME = 'digits'
NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN  # 297
SPLIT_SEED = 0
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
_MAX_GRAY = 16  # load_digits values are integers in [0, 16].


def split_indices() -> dict[str, np.ndarray]:
  """Returns the sorted scikit-learn indices of each split: {'train': [1500], 'test': [297]}."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': np.sort(perm[:NUM_TRAIN]), 'test': np.sort(perm[NUM_TRAIN:])}


def to_uint8(gray: np.ndarray) -> np.ndarray:
  """Maps load_digits gray levels 0..16 (any shape) to uint8 0..255 with rounding."""
  return np.rint(np.asarray(gray, np.float64) * (255.0 / _MAX_GRAY)).astype(np.uint8)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 1,500 train / 297 test.'}
  # Nothing is downloaded, so there are no URL checksums to look up. Without
  # this, tfds 4.9.10 looks for a checksums file next to the code through a
  # path check that imports `importlib_resources`, which it only installs on
  # Python < 3.9.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    # This builder lives outside the tfds package, so it cannot read its
    # metadata from a `dataset_info` directory: it states everything here.
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 8x8 handwritten digits (sklearn.datasets.load_digits).",
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        # Keys are scikit-learn indices, so records keep scikit-learn's order.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = to_uint8(digits.images)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int64)  # [1797]
    return {
        split: self._generate_examples(images, labels, indices)
        for split, indices in split_indices().items()
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}


def prepare_digits(data_dir: str | os.PathLike[str] | None) -> None:
  """Builds `digits` as array_record into data_dir; a no-op when it is already there.

  Nothing is downloaded: the images come from the copy inside scikit-learn, and
  building takes about a second. `None` means TFDS's default data_dir. TFDS
  writes into a temporary folder and renames it, but processes sharing one
  data_dir should still not build at the same time: call this once before
  starting them, or give each host its own data_dir.
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = Digits(data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
