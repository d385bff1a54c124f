r"""diffusers `UNet2DModel` / `DDPMScheduler` checkpoints in and out of a workdir.

  python -m diffusion_jax.tools.diffusers_checkpoint import ddpm-cifar10-32 \
      --workdir /tmp/ddpm_cifar10 [--preset cifar10] [--dataset NAME] [--data_dir DIR]
  python -m diffusion_jax.tools.diffusers_checkpoint export --workdir WD DST

`import` reads a diffusers folder (a downloaded `google/ddpm-cifar10-32`, say): the U-Net's
`config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, which needs torch), in
`unet/` or at the top, and `scheduler/scheduler_config.json` (or a top-level
`scheduler_config.json`) when present. It writes a workdir that `sample.py` and
`python evaluate.py` read as they read a trained one: `spec.json` and one
EMA-only checkpoint (`checkpointing.save_ema_only`, step 0). Everything is written into a
temporary sibling folder first and renamed at the end, so a failure leaves nothing behind.

`export` writes the latest good EMA parameters and the spec of a workdir as a diffusers
pipeline folder (`model_index.json`, `unet/`, `scheduler/`), which
`UNet2DModel.from_pretrained(DST, subfolder='unet')`, `DDPMScheduler.from_pretrained(DST,
subfolder='scheduler')` and `DDPMPipeline.from_pretrained(DST)` load.

What maps (both ways): a `UNet2DModel` of `DownBlock2D`/`AttnDownBlock2D` and
`UpBlock2D`/`AttnUpBlock2D` blocks, attention at the same levels down and up, the
"positional" time embedding with `flip_sin_to_cos=False` and `freq_shift=1` (DDPM's sines
first, frequencies `exp(-ln(10⁴) i / (half − 1))`), GroupNorm(32, ε = 1e-6), SiLU, TF-style
stride-2 convs (`downsample_padding=0`: one row/column of padding after, none before),
`conv` resampling, `mid_block_scale_factor=1`, one attention head or `attention_head_dim`
wide heads (the same contiguous channel split as ours), and a class embedding table
(`num_class_embeds = num_classes + 1`, our null label last). Each layer's parameters: conv
kernels OIHW ↔ HWIO, linear weights transposed, 1×1 shortcut convs ↔ our `nin_shortcut`
dense layers, GroupNorm weight ↔ scale. The scheduler: T, the β schedule (linear,
scaled_linear = our quad, squaredcos_cap_v2 = our cosine, sigmoid, `trained_betas` for the
others on export) and its range, `rescale_betas_zero_snr`, `variance_type` fixed_small /
fixed_large / learned_range, `prediction_type` epsilon / sample / v_prediction, and
`clip_sample` (our samplers' `clip_denoised`, in the spec's samplers).

Anything else is refused with one line naming the field and its value. The pure functions
(`unet_config_from_diffusers`, `params_from_diffusers`, `diffusers_config_from_unet`,
`params_to_diffusers`, `diffusion_from_scheduler`, `scheduler_config_from_spec`) do no IO.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import config as sampler_config
from diffusion_jax import spec as spec_lib
from diffusion_jax.models.layers import GROUPNORM_EPSILON, GROUPNORM_GROUPS
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.spec import OptimizerConfig

DOWN_BLOCKS = ('DownBlock2D', 'AttnDownBlock2D')
UP_BLOCKS = ('UpBlock2D', 'AttnUpBlock2D')
WEIGHTS_SAFETENSORS = 'diffusion_pytorch_model.safetensors'
WEIGHTS_BIN = 'diffusion_pytorch_model.bin'
DIFFUSERS_VERSION = '0.42.1'  # the version the export was checked against (tests)


class ConversionError(ValueError):
  """A checkpoint or config we cannot represent, or a malformed one; the message is one line."""


def _refuse(field: str, value: Any, allowed: str) -> ConversionError:
  return ConversionError(f'{field}={value!r} cannot be converted: {allowed}')


# ------------------------------------------------------------------------------------------
# The model's config.
# ------------------------------------------------------------------------------------------

# UNet2DModel's fields (diffusers 0.42) with the only values our U-Net computes; a config
# that lacks one has diffusers' default for it, listed in `_DIFFUSERS_DEFAULTS`.
_FIXED = dict(
    center_input_sample=(False, 'the input must not be rescaled'),
    time_embedding_type=('positional', "only DDPM's sinusoidal embedding maps"),
    flip_sin_to_cos=(False, "DDPM's embedding puts the sines first"),
    freq_shift=(1, "DDPM's frequencies are exp(-ln(1e4) i / (half - 1))"),
    mid_block_type=('UNetMidBlock2D', 'the middle is ResNet, attention, ResNet'),
    mid_block_scale_factor=(1, 'no output rescaling'),
    downsample_padding=(0, "DDPM's stride-2 conv pads one row/column after, none before"),
    downsample_type=('conv', 'a stride-2 3x3 conv'),
    upsample_type=('conv', 'nearest x2 and a 3x3 conv'),
    norm_num_groups=(GROUPNORM_GROUPS, f'GroupNorm has {GROUPNORM_GROUPS} groups'),
    norm_eps=(GROUPNORM_EPSILON, f'GroupNorm epsilon is {GROUPNORM_EPSILON}'),
    resnet_time_scale_shift=('default', 'the time embedding is added before the second norm'),
    add_attention=(True, 'the middle block has attention'),
    class_embed_type=(None, 'labels are a plain embedding table (num_class_embeds)'),
)
_DIFFUSERS_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type='positional', time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0,
    act_fn='silu', attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift='default', add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)


def _int(cfg: Mapping[str, Any], name: str) -> int:
  v = cfg[name]
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
    raise _refuse(name, v, 'must be a positive integer')
  return int(v)


def unet_config_from_diffusers(config: Mapping[str, Any]
                               ) -> tuple[UNetConfig, tuple[int, int, int]]:
  """(our U-Net config, the image shape (H, W, C)) of a diffusers `UNet2DModel` config
  (the parsed `config.json`). Raises ConversionError for what our U-Net cannot compute."""
  cls = config.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    raise _refuse('_class_name', cls, 'only UNet2DModel converts')
  known = set(_DIFFUSERS_DEFAULTS)
  unknown = sorted(k for k in config if not k.startswith('_') and k not in known)
  if unknown:
    raise _refuse(unknown[0], config[unknown[0]], f'not a UNet2DModel field of diffusers '
                  f'{DIFFUSERS_VERSION}')
  cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith('_')}}
  for name, (want, why) in _FIXED.items():
    have = cfg[name]
    same = (have == want if not isinstance(want, float)
            else isinstance(have, (int, float)) and abs(have - want) <= 1e-12)
    if not same:
      raise _refuse(name, have, f'{why} (only {want!r} converts)')
  if cfg['act_fn'] not in ('silu', 'swish'):
    raise _refuse('act_fn', cfg['act_fn'], "only 'silu' (swish) converts")
  if cfg['attn_norm_num_groups'] not in (None, GROUPNORM_GROUPS):
    raise _refuse('attn_norm_num_groups', cfg['attn_norm_num_groups'],
                  f'attention norms have {GROUPNORM_GROUPS} groups')
  widths = [int(c) for c in cfg['block_out_channels']]
  down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
  levels = len(widths)
  if len(down) != levels or len(up) != levels:
    raise _refuse('down_block_types', down, f'need one down and one up block per entry of '
                  f'block_out_channels={widths}')
  for field, types, allowed in (('down_block_types', down, DOWN_BLOCKS),
                                ('up_block_types', up, UP_BLOCKS)):
    bad = [t for t in types if t not in allowed]
    if bad:
      raise _refuse(field, bad[0], f'allowed block types: {", ".join(allowed)}')
  ch = widths[0]
  if any(w % ch for w in widths):
    raise _refuse('block_out_channels', widths, f'every width must be a multiple of the first '
                  f'({ch})')
  if cfg['time_embedding_dim'] not in (None, 4 * ch):
    raise _refuse('time_embedding_dim', cfg['time_embedding_dim'],
                  f'the time embedding is 4 x block_out_channels[0] = {4 * ch} wide')
  attn_levels = [i for i, t in enumerate(down) if t == 'AttnDownBlock2D']
  up_attn_levels = [levels - 1 - k for k, t in enumerate(up) if t == 'AttnUpBlock2D']
  if sorted(up_attn_levels) != attn_levels:
    raise _refuse('up_block_types', up, f'attention must be at the same levels as in '
                  f'down_block_types={down}')
  size = cfg['sample_size']
  if size is None:
    raise _refuse('sample_size', size, 'the image size is needed (attention is placed by '
                  'feature-map height)')
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
    raise _refuse('sample_size', size, f'must halve {levels - 1} times')
  in_ch = _int(cfg, 'in_channels')
  heads = cfg['attention_head_dim']
  num_head_channels = None
  if heads is not None:
    heads = int(heads)
    attn_widths = {widths[i] for i in attn_levels} | {widths[-1]}
    if all(w == heads for w in attn_widths):
      heads = None  # one head spanning the channels: our default
    elif any(w % heads for w in attn_widths):
      raise _refuse('attention_head_dim', heads, f'must divide the attention widths '
                    f'{sorted(attn_widths)}')
    else:
      num_head_channels = heads
  num_classes = None
  if cfg['num_class_embeds'] is not None:
    n = _int(cfg, 'num_class_embeds')
    if n < 2:
      raise _refuse('num_class_embeds', n, 'need at least one class and the null label')
    num_classes = n - 1
  dropout = float(cfg['dropout'])
  model = UNetConfig(
      ch=ch, out_ch=_int(cfg, 'out_channels'), ch_mult=tuple(w // ch for w in widths),
      num_res_blocks=_int(cfg, 'layers_per_block'),
      attn_resolutions=tuple(height // 2**i for i in attn_levels), dropout=dropout,
      resamp_with_conv=True, conv_shortcut=False, num_classes=num_classes,
      resblock_scale_shift=False, num_head_channels=num_head_channels)
  if model.ch_mult[0] != 1:  # unreachable: widths[0] == ch
    raise AssertionError(model.ch_mult)
  return model, (int(height), int(width), in_ch)


def diffusers_config_from_unet(model: UNetConfig, image_shape: tuple[int, int, int]
                               ) -> dict[str, Any]:
  """The `UNet2DModel` config (for `config.json`) of our U-Net on images of `image_shape`;
  raises ConversionError for options `UNet2DModel` cannot express."""
  if model.ch_mult[0] != 1:
    raise _refuse('model.ch_mult', list(model.ch_mult), "UNet2DModel's first level is "
                  "conv_in's width: ch_mult[0] must be 1")
  for name, want, why in (
      ('resblock_scale_shift', False, 'not mapped to resnet_time_scale_shift (unverified)'),
      ('conv_shortcut', False, "UNet2DModel's shortcuts are 1x1 convs"),
      ('resamp_with_conv', True, "UNet2DModel's resampling has convs"),
      ('time_embedding', 'sinusoidal', "diffusers' Fourier features are of log t, ours of "
       't / T'),
  ):
    if getattr(model, name) != want:
      raise _refuse(f'model.{name}', getattr(model, name), why)
  height, width, channels = image_shape
  levels = len(model.ch_mult)
  widths = [model.ch * m for m in model.ch_mult]
  attn_levels = [i for i in range(levels) if height // 2**i in model.attn_resolutions]
  attn_widths = sorted({widths[i] for i in attn_levels} | {widths[-1]})
  if model.num_head_channels is not None:
    head_dim = model.num_head_channels
  elif model.num_heads == 1:
    head_dim = None
  else:
    dims = {w // model.num_heads for w in attn_widths}
    if len(dims) != 1:
      raise _refuse('model.num_heads', model.num_heads, 'UNet2DModel has one head width for '
                    f'all attention layers; these widths {attn_widths} give several')
    head_dim = dims.pop()
  return dict(
      _class_name='UNet2DModel', _diffusers_version=DIFFUSERS_VERSION,
      sample_size=height if height == width else [height, width], in_channels=channels,
      out_channels=model.out_ch, center_input_sample=False, time_embedding_type='positional',
      time_embedding_dim=None, freq_shift=1, flip_sin_to_cos=False,
      down_block_types=['AttnDownBlock2D' if i in attn_levels else 'DownBlock2D'
                        for i in range(levels)],
      mid_block_type='UNetMidBlock2D',
      up_block_types=['AttnUpBlock2D' if i in attn_levels else 'UpBlock2D'
                      for i in reversed(range(levels))],
      block_out_channels=widths, layers_per_block=model.num_res_blocks,
      mid_block_scale_factor=1, downsample_padding=0, downsample_type='conv',
      upsample_type='conv', dropout=model.dropout, act_fn='silu', attention_head_dim=head_dim,
      norm_num_groups=GROUPNORM_GROUPS, attn_norm_num_groups=None, norm_eps=GROUPNORM_EPSILON,
      resnet_time_scale_shift='default', add_attention=True, class_embed_type=None,
      num_class_embeds=None if model.num_classes is None else model.num_classes + 1,
      num_train_timesteps=None)


# ------------------------------------------------------------------------------------------
# The parameters.
# ------------------------------------------------------------------------------------------

_BLOCK_PARTS = {'temb_proj': 'time_emb_proj', 'nin_shortcut': 'conv_shortcut',
                'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
                'proj_out': 'to_out.0'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}
# Key names of diffusers' old AttentionBlock (the google/ddpm-* files were converted with it).
_DEPRECATED_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _module_name(name: str, levels: int) -> str:
  """Our top-level module name → diffusers' prefix."""
  fixed = {'conv_in': 'conv_in', 'temb_dense0': 'time_embedding.linear_1',
           'temb_dense1': 'time_embedding.linear_2', 'label_emb': 'class_embedding',
           'mid_block_1': 'mid_block.resnets.0', 'mid_attn_1': 'mid_block.attentions.0',
           'mid_block_2': 'mid_block.resnets.1', 'norm_out': 'conv_norm_out',
           'conv_out': 'conv_out'}
  if name in fixed:
    return fixed[name]
  m = re.fullmatch(r'(down|up)_(\d+)_(block|attn)_(\d+)', name)
  if m:
    way, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    k = i if way == 'down' else levels - 1 - i  # diffusers' up blocks go from the bottom
    return f'{way}_blocks.{k}.{"resnets" if kind == "block" else "attentions"}.{j}'
  m = re.fullmatch(r'down_(\d+)_downsample', name)
  if m:
    return f'down_blocks.{m.group(1)}.downsamplers.0'
  m = re.fullmatch(r'up_(\d+)_upsample', name)
  if m:
    return f'up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0'
  raise ConversionError(f'our parameter {name!r} has no diffusers counterpart')


def parameter_table(abstract_params: Mapping[str, Any], levels: int
                    ) -> list[tuple[tuple[str, ...], str, str]]:
  """(our path, diffusers key, kind) for every parameter of our U-Net, from its (abstract)
  parameter tree; kind: 'conv' (HWIO ↔ OIHW), 'nin' (dense [I, O] ↔ 1x1 conv [O, I, 1, 1]),
  'dense' (transposed) or 'copy' (norm scales, biases, embedding tables)."""
  rows = []
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
  for path, leaf in flat:
    names = tuple(p.key for p in path)
    parts = [_module_name(names[0], levels)]
    parts += [_BLOCK_PARTS.get(n, n) for n in names[1:-1]]
    parts.append(_LEAF[names[-1]])
    ndim = len(leaf.shape)
    if names[-1] != 'kernel':
      kind = 'copy'
    elif ndim == 4:
      kind = 'conv'
    elif names[-2] == 'nin_shortcut':
      kind = 'nin'
    else:
      kind = 'dense'
    rows.append((names, '.'.join(parts), kind))
  return rows


def _to_ours(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == 'nin':
    return x[:, :, 0, 0].T  # [O, I, 1, 1] -> [I, O]
  if kind == 'dense':
    return x.T  # [O, I] -> [I, O]
  return x


def _to_theirs(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if kind == 'nin':
    return x.T[:, :, None, None]
  if kind == 'dense':
    return x.T
  return x


def canonical_keys(state: Mapping[str, Any]) -> dict[str, Any]:
  """`state` with the old AttentionBlock names (query, key, value, proj_attn) renamed."""
  out = {}
  for key, value in state.items():
    parts = key.split('.')
    if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTN and 'attentions' in parts:
      key = '.'.join(parts[:-2] + [_DEPRECATED_ATTN[parts[-2]], parts[-1]])
    out[key] = value
  return out


def params_from_diffusers(state: Mapping[str, np.ndarray], model: UNetConfig,
                          image_shape: tuple[int, int, int], where: str = 'the weights'
                          ) -> dict[str, Any]:
  """Our U-Net's parameters (a nested dict of float32 NumPy arrays) from a diffusers state
  dict of NumPy arrays. Every key must be used and every shape fit; else ConversionError."""
  abstract = jax.eval_shape(_init_fn(model, image_shape), jax.random.PRNGKey(0))
  state = canonical_keys(state)
  rows = parameter_table(abstract, len(model.ch_mult))
  wanted = {key for _, key, _ in rows}
  extra = sorted(set(state) - wanted)
  if extra:
    raise ConversionError(f'{where} hold {extra[0]} (and {len(extra) - 1} more unknown keys) '
                          'that config.json does not describe')
  out: dict[str, Any] = {}
  shapes = {names: tuple(leaf.shape) for names, leaf in _leaves(abstract)}
  for names, key, kind in rows:
    if key not in state:
      raise ConversionError(f'{where} lack {key}, which config.json needs')
    theirs = np.asarray(state[key])
    value = _to_ours(theirs, kind)
    want = shapes[names]
    if value.shape != want:
      raise ConversionError(
          f'{where}: {key} has shape {tuple(theirs.shape)}, but config.json needs '
          f'{tuple(_to_theirs(np.zeros(want), kind).shape)}')
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  return out


def params_to_diffusers(params: Mapping[str, Any], model: UNetConfig) -> dict[str, np.ndarray]:
  """The diffusers state dict (float32 NumPy arrays) of our U-Net's parameters."""
  flat = dict(_leaves(params))
  return {key: np.ascontiguousarray(_to_theirs(np.asarray(flat[names], np.float32), kind))
          for names, key, kind in parameter_table(params, len(model.ch_mult))}


def _leaves(tree) -> list[tuple[tuple[str, ...], Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(p.key for p in path), leaf) for path, leaf in flat]


def _init_fn(model: UNetConfig, image_shape: tuple[int, int, int]):
  def init(rng):
    x = np.zeros((1,) + tuple(image_shape), np.float32)
    t = np.zeros((1,), np.int32)
    y = np.zeros((1,), np.int32) if model.num_classes else None
    return model.make().init({'params': rng}, x, t, y=y, train=False)['params']
  return init


# ------------------------------------------------------------------------------------------
# The scheduler.
# ------------------------------------------------------------------------------------------

_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'quad', 'squaredcos_cap_v2': 'cosine',
              'sigmoid': 'sigmoid'}
_VARIANCES = {'fixed_small': 'fixedsmall', 'fixed_small_log': 'fixedsmall',
              'fixed_large': 'fixedlarge', 'learned_range': 'learned_range'}
_PREDICTIONS = {'epsilon': 'eps', 'sample': 'xstart', 'v_prediction': 'v'}
_SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, variance_type='fixed_small', clip_sample=True, prediction_type='epsilon',
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
    sample_max_value=1.0, timestep_spacing='leading', steps_offset=0,
    rescale_betas_zero_snr=False)


@dataclasses.dataclass(frozen=True)
class SchedulerFacts:
  """What a `DDPMScheduler` config says of the process: its diffusion and the x̂₀ clipping."""
  diffusion: spec_lib.DiffusionSpec
  clip_sample: bool


def diffusion_from_scheduler(config: Mapping[str, Any] | None) -> SchedulerFacts:
  """Our diffusion spec from a `DDPMScheduler` config (None: diffusers' defaults)."""
  cfg = {**_SCHEDULER_DEFAULTS,
         **{k: v for k, v in (config or {}).items() if not k.startswith('_')}}
  cls = (config or {}).get('_class_name', 'DDPMScheduler')
  if cls not in ('DDPMScheduler', 'DDIMScheduler'):
    raise _refuse('_class_name', cls, 'only DDPMScheduler (or DDIMScheduler) configs convert')
  if cfg['trained_betas'] is not None:
    raise _refuse('trained_betas', '[...]', 'give the schedule by name')
  if cfg['beta_schedule'] not in _SCHEDULES:
    raise _refuse('beta_schedule', cfg['beta_schedule'], f'allowed: {", ".join(_SCHEDULES)}')
  if cfg['variance_type'] not in _VARIANCES:
    raise _refuse('variance_type', cfg['variance_type'], f'allowed: {", ".join(_VARIANCES)}')
  if cfg['prediction_type'] not in _PREDICTIONS:
    raise _refuse('prediction_type', cfg['prediction_type'],
                  f'allowed: {", ".join(_PREDICTIONS)}')
  if cfg['thresholding']:
    raise _refuse('thresholding', cfg['thresholding'], 'dynamic thresholding is not ours')
  if cfg['clip_sample'] and cfg['clip_sample_range'] != 1.0:
    raise _refuse('clip_sample_range', cfg['clip_sample_range'], 'x̂₀ is clipped to [-1, 1]')
  t = cfg['num_train_timesteps']
  if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
    raise _refuse('num_train_timesteps', t, 'must be a positive integer')
  diffusion = spec_lib.DiffusionSpec(
      schedule=_SCHEDULES[cfg['beta_schedule']], num_timesteps=t,
      beta_start=float(cfg['beta_start']), beta_end=float(cfg['beta_end']),
      zero_terminal_snr=bool(cfg['rescale_betas_zero_snr']),
      parameterization=gd.Parameterization(_PREDICTIONS[cfg['prediction_type']],
                                           _VARIANCES[cfg['variance_type']]),
      loss_type='mse', snr_gamma=None, timestep_sampling='uniform')
  return SchedulerFacts(diffusion=diffusion, clip_sample=bool(cfg['clip_sample']))


def scheduler_config_from_spec(spec: spec_lib.ExperimentSpec) -> dict[str, Any]:
  """The `DDPMScheduler` config of a spec's diffusion (`clip_sample` from its eval sampler)."""
  d = spec.diffusion
  param = d.parameterization
  variance = {v: k for k, v in _VARIANCES.items() if k != 'fixed_small_log'}
  prediction = {v: k for k, v in _PREDICTIONS.items()}
  if param.var_type.value not in variance:
    raise _refuse('diffusion.var_type', param.var_type.value,
                  f'allowed: {", ".join(variance)}')
  if param.mean_type.value not in prediction:
    raise _refuse('diffusion.mean_type', param.mean_type.value,
                  f'allowed: {", ".join(prediction)}')
  names = {v: k for k, v in _SCHEDULES.items()}
  out = dict(_class_name='DDPMScheduler', _diffusers_version=DIFFUSERS_VERSION,
             **_SCHEDULER_DEFAULTS)
  out.update(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
             beta_end=d.beta_end, variance_type=variance[param.var_type.value],
             prediction_type=prediction[param.mean_type.value],
             clip_sample=bool(spec.eval.sampler.clip_denoised),
             rescale_betas_zero_snr=d.zero_terminal_snr)
  if d.schedule in names:
    out['beta_schedule'] = names[d.schedule]
  else:  # const, jsd, warmup*: the β values themselves (before any zero-SNR rescaling)
    betas = spec_lib.DiffusionSpec(**{**dataclasses.asdict(d), 'zero_terminal_snr': False,
                                      'parameterization': param}).betas()
    out['trained_betas'] = [float(b) for b in betas]
  return out


# ------------------------------------------------------------------------------------------
# The paper's five models, as google/ddpm-* publish them.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
  """One of the paper's released models: its diffusers configs and our training facts."""
  hub_name: str          # where the diffusers conversion lives (downloaded elsewhere)
  dataset: str           # our TFDS name (configs/*.py)
  unet: Mapping[str, Any]
  scheduler: Mapping[str, Any]
  batch_size: int
  learning_rate: float
  num_train_steps: int
  dropout: float         # training only: the released configs do not record it


def _ddpm_unet(size: int, widths: tuple[int, ...], attn_level: int) -> dict[str, Any]:
  levels = len(widths)
  return dict(
      _class_name='UNet2DModel', sample_size=size, in_channels=3, out_channels=3,
      center_input_sample=False, time_embedding_type='positional', freq_shift=1,
      flip_sin_to_cos=False,
      down_block_types=['AttnDownBlock2D' if i == attn_level else 'DownBlock2D'
                        for i in range(levels)],
      up_block_types=['AttnUpBlock2D' if i == attn_level else 'UpBlock2D'
                      for i in reversed(range(levels))],
      block_out_channels=list(widths), layers_per_block=2, mid_block_scale_factor=1,
      downsample_padding=0, act_fn='silu', attention_head_dim=None, norm_num_groups=32,
      norm_eps=1e-6)


_DDPM_SCHEDULER = dict(_class_name='DDPMScheduler', num_train_timesteps=1000, beta_start=1e-4,
                       beta_end=0.02, beta_schedule='linear', trained_betas=None,
                       variance_type='fixed_large', clip_sample=True)
_UNET_256 = _ddpm_unet(256, (128, 128, 256, 256, 512, 512), attn_level=4)  # 16 px
PRESETS: dict[str, Preset] = {
    'cifar10': Preset('google/ddpm-cifar10-32', 'cifar10',
                      _ddpm_unet(32, (128, 256, 256, 256), attn_level=1), _DDPM_SCHEDULER,
                      batch_size=128, learning_rate=2e-4, num_train_steps=800_000, dropout=0.1),
    'celebahq': Preset('google/ddpm-celebahq-256', 'celeb_a_hq/256', _UNET_256, _DDPM_SCHEDULER,
                       batch_size=64, learning_rate=2e-5, num_train_steps=500_000, dropout=0.0),
    'church': Preset('google/ddpm-church-256', 'lsun/church_outdoor', _UNET_256,
                     _DDPM_SCHEDULER, batch_size=64, learning_rate=2e-5,
                     num_train_steps=1_200_000, dropout=0.0),
    'bedroom': Preset('google/ddpm-bedroom-256', 'lsun/bedroom', _UNET_256, _DDPM_SCHEDULER,
                      batch_size=64, learning_rate=2e-5, num_train_steps=1_150_000,
                      dropout=0.0),
    'cat': Preset('google/ddpm-cat-256', 'lsun/cat', _UNET_256, _DDPM_SCHEDULER,
                  batch_size=64, learning_rate=2e-5, num_train_steps=1_760_000, dropout=0.1),
}


def build_spec(model: UNetConfig, image_shape: tuple[int, int, int], facts: SchedulerFacts, *,
               dataset: str, data_dir: str | None = None, preset: Preset | None = None
               ) -> spec_lib.ExperimentSpec:
  """The spec of an imported model: its model and diffusion, the dataset it was trained on,
  the training facts of `preset` (else configs/default.py's), and samplers that clip x̂₀ as
  the scheduler did. Nothing was trained here: the training fields only describe the
  original run, so that a config-built spec of the same preset differs in none."""
  if preset is not None:
    model = dataclasses.replace(model, dropout=preset.dropout)
  want = facts.diffusion.parameterization.out_channels(image_shape[-1])
  if model.out_ch != want:
    param = facts.diffusion.parameterization
    raise _refuse('out_channels', model.out_ch, f'in_channels={image_shape[-1]} with '
                  f'variance_type {param.var_type.value} needs {want} output channels')
  sampler = sampler_config.SamplerConfig.create('ddim', steps=min(100, facts.diffusion.num_timesteps),
                                          clip_denoised=facts.clip_sample)
  return spec_lib.ExperimentSpec(
      seed=0,
      data=spec_lib.DataSpec(dataset=dataset, image_shape=image_shape,
                             num_classes=model.num_classes or 0, data_dir=data_dir,
                             random_flip=True),
      model=dataclasses.replace(model, time_scale=float(facts.diffusion.num_timesteps)),
      diffusion=facts.diffusion,
      optimizer=OptimizerConfig(
          learning_rate=preset.learning_rate if preset else OptimizerConfig.learning_rate),
      training=spec_lib.TrainingSpec(batch_size=preset.batch_size if preset else 128,
                                     ema_decay=0.9999, grad_accum_steps=1, label_dropout=0.0),
      run=spec_lib.RunSpec(num_train_steps=preset.num_train_steps if preset else 800_000,
                           log_every_steps=100, checkpoint_every_steps=10_000,
                           keep_checkpoints=3, sample_every_steps=0, num_samples=64,
                           sampler=sampler),
      eval=spec_lib.EvalSpec(every_steps=0, num_samples=256, bpd_examples=256, sampler=sampler,
                             inception_weights=None))


def find_preset(unet_config: Mapping[str, Any]) -> str | None:
  """The one preset whose U-Net (as we compute it) equals this config's, else None (the
  four 256-px models share one architecture: pass --preset for them)."""
  try:
    mine = unet_config_from_diffusers(unet_config)
  except ConversionError:
    return None
  hits = [name for name, p in PRESETS.items() if unet_config_from_diffusers(p.unet) == mine]
  return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------------------------
# Folders.
# ------------------------------------------------------------------------------------------


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f'{path} cannot be read as JSON ({type(e).__name__})') from None
  if not isinstance(value, dict):
    raise ConversionError(f'{path} is not a JSON object')
  return value


def _read_weights(path: epath.Path) -> dict[str, np.ndarray]:
  if path.name.endswith('.safetensors'):
    from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    try:
      return dict(load(path.read_bytes()))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{path} cannot be read as safetensors '
                            f'({" ".join(str(e).split())[:200]})') from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f'{path} is a PyTorch pickle and needs torch to read: pip install '
                          "'diffusion-jax[fid]' (or convert it to safetensors)") from None
  with path.open('rb') as f:
    state = torch.load(f, map_location='cpu', weights_only=True)
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def read_diffusers_folder(src) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                        dict[str, Any] | None]:
  """(U-Net config, state dict, scheduler config or None) of a diffusers folder."""
  root = epath.Path(os.fspath(src))
  if not root.is_dir():
    raise ConversionError(f'{root} is not a folder')
  unet_dir = next((d for d in (root / 'unet', root) if (d / 'config.json').exists()), None)
  if unet_dir is None:
    raise ConversionError(f'{root} has no unet/config.json or config.json: not a diffusers '
                          'UNet2DModel folder')
  config = _read_json(unet_dir / 'config.json')
  weights = next((unet_dir / n for n in (WEIGHTS_SAFETENSORS, WEIGHTS_BIN)
                  if (unet_dir / n).exists()), None)
  if weights is None:
    raise ConversionError(f'{unet_dir} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN}')
  sched = next((p for p in (root / 'scheduler' / 'scheduler_config.json',
                            root / 'scheduler_config.json') if p.exists()), None)
  scheduler = _read_json(sched) if sched is not None else None
  return config, _read_weights(weights), scheduler


def _fresh_destination(dst: epath.Path, flag: str) -> None:
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise FileExistsError(f'{flag} {dst} exists and is not empty; nothing was written')


def _publish(tmp: epath.Path, dst: epath.Path) -> None:
  """Moves the finished `tmp` folder to `dst` (an absent or empty folder)."""
  if dst.exists():
    dst.rmdir()
  tmp.rename(dst)


def _temporary_sibling(dst: epath.Path) -> epath.Path:
  return dst.parent / f'.{dst.name}.tmp-{uuid.uuid4().hex[:8]}'


def import_checkpoint(src, workdir, *, preset: str | None = None, dataset: str | None = None,
                      data_dir: str | None = None) -> spec_lib.ExperimentSpec:
  """Writes the workdir `workdir` (absent or empty) of the diffusers folder `src`: spec.json
  and the EMA-only checkpoint 0. Returns the spec. Nothing is written on failure."""
  from diffusion_jax.storage import checkpointing  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import paths  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  dst = paths.as_path(workdir)
  _fresh_destination(dst, '--workdir')
  if preset is not None and preset not in PRESETS:
    raise ValueError(f'unknown --preset {preset!r}; allowed: {", ".join(PRESETS)}')
  unet_cfg, state, sched_cfg = read_diffusers_folder(src)
  model, image_shape = unet_config_from_diffusers(unet_cfg)
  facts = diffusion_from_scheduler(sched_cfg)
  name = preset or find_preset(unet_cfg)
  chosen = PRESETS[name] if name else None
  if chosen is not None and unet_config_from_diffusers(chosen.unet) != (model, image_shape):
    raise ConversionError(f'{src} is not the --preset {name} model (config.json differs from '
                          f'that of {chosen.hub_name})')
  params = params_from_diffusers(state, model, image_shape,
                                 where=f'the weights in {os.fspath(src)}')
  spec = build_spec(model, image_shape, facts, preset=chosen, data_dir=data_dir,
                    dataset=dataset or (chosen.dataset if chosen else 'unknown'))
  tmp = _temporary_sibling(dst)
  try:
    tmp.mkdir(parents=True)
    workdir_lib.write_json(tmp / workdir_lib.SPEC, spec.to_json())
    workdir_lib.write_json(tmp / 'imported_from.json', dict(
        source=os.fspath(src), preset=name, unet_config=unet_cfg, scheduler_config=sched_cfg))
    checkpointing.save_ema_only(tmp, 0, params, source=f'diffusers: {os.fspath(src)}')
    _publish(tmp, dst)
  finally:
    if tmp.exists():
      tmp.rmtree()
  return spec


def export_checkpoint(workdir, dst, *, step: int | None = None) -> epath.Path:
  """Writes the latest good (or `step`'s) EMA parameters of `workdir` and its diffusion as
  a diffusers DDPMPipeline folder `dst` (absent or empty). Nothing is written on failure."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import paths  # pylint: disable=g-import-not-at-top
  from diffusion_jax import trained_model  # pylint: disable=g-import-not-at-top
  out = paths.as_path(dst)
  _fresh_destination(out, 'DST')
  wd = trained_model.read_workdir(workdir, step)
  unet_cfg = diffusers_config_from_unet(wd.spec.model, wd.spec.data.image_shape)
  sched_cfg = scheduler_config_from_spec(wd.spec)
  trained = trained_model.load_ema_params(wd)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), trained.ema_params)
  state = params_to_diffusers(params, wd.spec.model)
  tmp = _temporary_sibling(out)
  try:
    (tmp / 'unet').mkdir(parents=True)
    (tmp / 'scheduler').mkdir()
    (tmp / 'unet' / 'config.json').write_text(json.dumps(unet_cfg, indent=2) + '\n')
    (tmp / 'unet' / WEIGHTS_SAFETENSORS).write_bytes(save(state, metadata={'format': 'pt'}))
    (tmp / 'scheduler' / 'scheduler_config.json').write_text(
        json.dumps(sched_cfg, indent=2) + '\n')
    (tmp / 'model_index.json').write_text(json.dumps(dict(
        _class_name='DDPMPipeline', _diffusers_version=DIFFUSERS_VERSION,
        scheduler=['diffusers', 'DDPMScheduler'], unet=['diffusers', 'UNet2DModel']),
        indent=2) + '\n')
    _publish(tmp, out)
  finally:
    if tmp.exists():
      tmp.rmtree()
  return out


# ------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m diffusion_jax.tools.diffusers_checkpoint',
      description='Import a diffusers UNet2DModel/DDPMScheduler folder as a workdir, or '
      'export a workdir as one.')
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='a diffusers folder -> a new workdir')
  imp.add_argument('src', help='the diffusers folder (unet/ or top-level config.json)')
  imp.add_argument('--workdir', required=True, help='the workdir to write (absent or empty)')
  imp.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help="one of the paper's models (default: found from config.json when "
                   'unique)')
  imp.add_argument('--dataset', default=None, help="the TFDS name evaluate reads (default: "
                   "the preset's)")
  imp.add_argument('--data_dir', default=None, help='where that dataset is prepared')
  exp = sub.add_parser('export', help='a workdir -> a new diffusers DDPMPipeline folder')
  exp.add_argument('--workdir', required=True)
  exp.add_argument('--step', type=int, default=None, help='default: the latest good one')
  exp.add_argument('dst', help='the folder to write (absent or empty)')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      spec = import_checkpoint(args.src, args.workdir, preset=args.preset,
                               dataset=args.dataset, data_dir=args.data_dir)
      print(f'wrote {args.workdir}: {spec.data.image_shape} images, T='
            f'{spec.diffusion.num_timesteps}, {spec.parameterization.mean_type.value}/'
            f'{spec.parameterization.var_type.value}, dataset {spec.data.dataset}')
    else:
      out = export_checkpoint(args.workdir, args.dst, step=args.step)
      print(f'wrote {out}')
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
