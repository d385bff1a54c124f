"""Image files: the one place that writes PNGs (training's sample grids, sample.py's outputs)."""

import io
import os

import numpy as np
from etils import epath


def save_png(path: str | os.PathLike[str], image: np.ndarray, scale: int = 1) -> None:
  """Writes uint8 `[H, W, C]` (C = 1 or 3) to `path` (local or remote, through epath),
  enlarged `scale` times (nearest neighbour); makes the directory if needed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, 'PNG')
  path.write_bytes(buffer.getvalue())


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255], rounding to the nearest level."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 `[N, H, W, C]` → one uint8 image `[rows·(H+pad)+pad, ncol·(W+pad)+pad, C]`."""
  n, h, w, c = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + k * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid
