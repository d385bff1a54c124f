"""Image files: the one place that writes PNGs (training's sample grids, sample.py's outputs)."""

import os

import numpy as np


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Writes uint8 `[H, W, C]` (C = 1 or 3) to `path`, enlarged `scale` times (nearest
  neighbour); makes the directory if needed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
