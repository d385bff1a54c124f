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

`expected_shapes()` lists all 472 names with their shapes. `convert_torch_state_dict`
maps the PyTorch names of pytorch-fid's `FIDInceptionA/C/E` network (`pt_inception-2015-12-05`
state dict, arrays converted to NumPy) to this format, e.g.

    import numpy as np, torch
    sd = torch.load('pt_inception-2015-12-05-6726825d.pth')
    np.savez('inception_fid.npz', **convert_torch_state_dict(
        {k: v.numpy() for k, v in sd.items()}))

Input: uint8 images `[N, H, W, 3]`, resized bilinearly to 299×299 and scaled to [-1, 1].
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
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
  """`x` float `[N, 299, 299, 3]` in [-1, 1] → (pool3 features `[N, 2048]`, logits `[N, 1008]`)."""

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
    logits = nn.Dense(NUM_LOGITS, name='fc')(pool3)                        # [N, 1008]
    return pool3, logits


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 `[N, H, W, 3]` (or 1 channel, repeated) → float32 `[N, 299, 299, 3]` in [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), method='bilinear',
                       antialias=False)
  return x / 127.5 - 1.0


def _flatten(tree, prefix: str) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join([prefix] + [p.key for p in path])] = leaf
  return out


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{file key: shape} of every variable of `InceptionV3`, without computing anything."""
  abstract = jax.eval_shape(
      InceptionV3().init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  shapes = {}
  for collection in ('params', 'batch_stats'):
    shapes.update({k: tuple(v.shape) for k, v in _flatten(abstract[collection],
                                                            collection).items()})
  return shapes


def load_variables(path: str | os.PathLike[str] | None) -> dict[str, Any]:
  """Reads the weights file (format in the module docstring) into Flax variables.

  Raises FileNotFoundError naming `--inception_weights` when `path` is None or missing, and
  ValueError on a missing, unexpected or misshapen array.
  """
  if path is None or not os.path.isfile(os.fspath(path)):
    what = 'no Inception weights given' if path is None else f'{os.fspath(path)} not found'
    raise FileNotFoundError(
        f'{what}: pass --inception_weights=PATH, an .npz of the FID Inception-v3 weights '
        '(format in diffusion_jax/models/inception.py; nothing is downloaded)')
  want = expected_shapes()
  with np.load(os.fspath(path)) as f:
    arrays = {k: f[k] for k in f.files}
  missing = sorted(set(want) - set(arrays))
  extra = sorted(set(arrays) - set(want))
  if missing or extra:
    raise ValueError(f'{path}: not an FID Inception-v3 weights file: {len(missing)} arrays '
                     f'missing (first: {missing[:3]}), {len(extra)} unexpected '
                     f'(first: {extra[:3]})')
  variables: dict[str, Any] = {}
  for key, shape in want.items():
    if arrays[key].shape != shape:
      raise ValueError(f'{path}: {key} has shape {arrays[key].shape}, expected {shape}')
    node = variables
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arrays[key], jnp.float32)
  return variables


_TORCH_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
             'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def convert_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid's FID Inception state dict (NumPy arrays) → this module's file format.

  Conv weights OIHW → HWIO, fc weight [out, in] → [in, out]; BatchNorm weight/bias/running
  statistics → scale/bias/mean/var; `num_batches_tracked` is dropped.
  """
  out = {}
  for name, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = name.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue
    if parts[0] == 'fc':
      out[f'params/fc/{parts[1].replace("weight", "kernel")}'] = (
          value.T if parts[1] == 'weight' else value)
    elif parts[-2] == 'conv' and parts[-1] == 'weight':
      out['params/' + '/'.join(parts[:-1]) + '/kernel'] = value.transpose(2, 3, 1, 0)
    elif parts[-2] == 'bn' and parts[-1] in _TORCH_BN:
      collection, leaf = _TORCH_BN[parts[-1]]
      out[f'{collection}/' + '/'.join(parts[:-1]) + f'/{leaf}'] = value
    else:
      raise ValueError(f'unexpected entry {name!r} in the state dict')
  return out
