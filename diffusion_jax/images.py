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
