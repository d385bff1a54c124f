"""`rgb32`: a tiny TFDS dataset of 32×32 RGB images (smooth random colour fields), built
offline in a test's data_dir so that evaluation can run on CIFAR-10-shaped data. Child
processes read the prepared files without this code (TFDS's read-only builder)."""

import numpy as np
import tensorflow_datasets as tfds

NAME = 'rgb32'
SIZES = {'train': 24, 'test': 8}


def smooth_fields(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """uint8 `[n, size, size, 3]`: sums of a few random low-frequency sinusoids per channel."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing='ij')
  out = np.zeros((n, size, size, 3))
  for _ in range(4):
    fx, fy = rng.uniform(0.5, 3.0, (2, n, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    out += np.sin(2 * np.pi * (fx * xx[None, :, :, None] + fy * yy[None, :, :, None]) + phase)
  out = (out - out.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(out, axis=(1, 2, 3),
                                                                keepdims=True)
  return np.round(out * 255).astype(np.uint8)


class Rgb32(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  url_infos = None  # nothing to download (see data/digits.py)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=2)}), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name, i) for i, name in enumerate(SIZES)}

  def _generate_examples(self, split, seed):
    images = smooth_fields(np.random.default_rng(seed), SIZES[split], 32)
    for i, image in enumerate(images):
      yield i, dict(image=image, label=i % 2)


def prepare(data_dir: str) -> None:
  builder = Rgb32(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
