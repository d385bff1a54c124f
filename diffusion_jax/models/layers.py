"""Building blocks of the DDPM U-Net (Ho et al. 2020, appendix B and the released TF code).

Everything here works on NHWC arrays. The blocks use the layer names of the original
``diffusion_tf`` code (``norm1``, ``conv1``, ``temb_proj``, ``nin_shortcut``, ``q``, ``k``, ``v``,
``proj_out``), so the parameter tree reads next to the paper's code.

Precision: every layer takes ``dtype`` (the compute dtype) and ``param_dtype`` (the dtype the
parameters are stored in). GroupNorm statistics and the attention softmax are computed in float32
whatever ``dtype`` is (``GroupNorm`` below and ``jax.nn.dot_product_attention`` both promote).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

GROUPNORM_GROUPS = 32  # DDPM: tf.contrib.layers.group_norm default
GROUPNORM_EPSILON = 1e-6  # DDPM's TF code


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The DDPM initialiser: variance_scaling(scale, 'fan_avg', 'uniform').

  The TF code used ``scale=1e-10`` for the layers it meant to be zero (the last conv of each
  ResNet block, the attention output projection, the output conv); we use exact zeros for
  ``scale == 0``, so the network's output is exactly zero at initialisation.
  """
  if scale == 0.0:
    return nn.initializers.zeros_init()
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of (0-indexed) timesteps, as in DDPM / tensor2tensor.

  With ``half = dim // 2`` and ``freq_i = exp(-log(max_period) * i / (half - 1))`` for
  ``i = 0 .. half-1``, the result is ``[sin(t * freq), cos(t * freq)]`` (sines first), with one
  zero column appended when ``dim`` is odd.

  Args:
    t: ``[B]`` timesteps, integer or float.
    dim: embedding width, at least 4 (the formula divides by ``half - 1``).
    max_period: the longest wavelength's base (10000 in DDPM).

  Returns:
    ``[B, dim]`` float32.
  """
  if dim < 4:
    raise ValueError(
      f"timestep_embedding needs dim >= 4 (it divides by dim // 2 - 1); got dim={dim}")
  if t.ndim != 1:
    raise ValueError(f"timestep_embedding expects t of shape [B]; got shape {t.shape}")
  half = dim // 2
  i = jnp.arange(half, dtype=jnp.float32)  # [half]
  freqs = jnp.exp(-math.log(max_period) / (half - 1) * i)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, 2 * half]
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))  # [B, dim]
  return emb


def fourier_embedding(t: jax.Array, w: jax.Array) -> jax.Array:
  """Random Fourier features of a continuous time (Tancik et al. 2020; score_sde's
  ``GaussianFourierProjection``): ``[sin(2π t w), cos(2π t w)]`` (sines first).

  Args:
    t: ``[B]`` times, float.
    w: ``[half]`` frequencies, drawn once from N(0, scale²) and then kept fixed.

  Returns:
    ``[B, 2 * half]`` float32.
  """
  if t.ndim != 1 or w.ndim != 1:
    raise ValueError(f"fourier_embedding expects t [B] and w [half]; got shapes {t.shape} and "
                     f"{w.shape}")
  args = 2.0 * math.pi * t.astype(jnp.float32)[:, None] * w.astype(jnp.float32)[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, 2 * half]


def _check_split(layer: str, channels: int, name: str, parts: int) -> None:
  if channels % parts != 0:
    raise ValueError(f"{layer}: {channels} channels cannot be split into {name}={parts} equal parts")


class GroupNorm(nn.Module):
  """GroupNorm over NHWC arrays: statistics per example and group of ``C / num_groups`` channels.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the mean and the (biased)
  variance over H, W and the group's channels, as ``tf.contrib.layers.group_norm`` in DDPM and
  ``flax.linen.GroupNorm`` (same parameters, ``scale`` and ``bias`` of shape ``[C]``).

  The statistics are computed in float32 in one pass over ``x`` that is exact in exact arithmetic
  and as stable as the two-pass formula: per channel, the sums of ``d = x - k`` and ``d**2`` with
  ``k`` the channel's value at the first pixel (a shift that keeps ``d`` small, as in a two-pass
  variance), then each group's mean and variance from its channels' by Chan et al.'s pairwise
  combination. Reducing over H and W first, to ``[B, C]``, then over the group's few channels,
  is 2-3x faster on XLA:CPU than flax's reduction over ``[B, H, W, G, C/G]``, and its gradient is
  cheaper too (docs/benchmarks.md); the normalisation is one multiply-add per element.
  """

  num_groups: int = GROUPNORM_GROUPS
  epsilon: float = GROUPNORM_EPSILON
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape  # [B, H, W, C]
    _check_split("GroupNorm", c, "num_groups", self.num_groups)
    scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
    per_group = c // self.num_groups
    n = h * w  # elements per channel and example
    xf = x.astype(jnp.float32)
    k = jax.lax.stop_gradient(xf[:, :1, :1, :])  # [B, 1, 1, C]: the shift
    d = xf - k
    s1 = jnp.sum(d, axis=(1, 2))  # [B, C]
    s2 = jnp.sum(d * d, axis=(1, 2))  # [B, C]
    mean_c = (k[:, 0, 0, :] + s1 / n).reshape(b, self.num_groups, per_group)  # [B, G, C/G]
    m2_c = (s2 - s1 * s1 / n).reshape(b, self.num_groups, per_group)  # sum of squared deviations
    mean = jnp.mean(mean_c, axis=-1, keepdims=True)  # [B, G, 1]
    m2 = jnp.sum(m2_c + n * jnp.square(mean_c - mean), axis=-1, keepdims=True)  # [B, G, 1]
    var = jnp.maximum(m2, 0.0) / (n * per_group)  # [B, G, 1]
    inv = jax.lax.rsqrt(var + self.epsilon)  # [B, G, 1]
    # y = x * a + (bias - mean * a) with a = inv * scale, per example and channel.
    a = (inv * scale.astype(jnp.float32).reshape(self.num_groups, per_group)).reshape(b, c)
    shift = bias.astype(jnp.float32) - (mean * a.reshape(b, self.num_groups, per_group)).reshape(b, c)
    y = xf * a[:, None, None, :] + shift[:, None, None, :]  # [B, H, W, C]
    return y.astype(self.dtype)


def group_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> GroupNorm:
  """GroupNorm(32 groups, eps 1e-6) with scale and bias, as DDPM."""
  return GroupNorm(dtype=dtype, param_dtype=param_dtype, name=name)


def conv3x3(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
            init_scale: float = 1.0) -> nn.Conv:
  """A 3x3 conv, stride 1, SAME padding (one pixel each side), DDPM's initialiser."""
  return nn.Conv(
    features,
    kernel_size=(3, 3),
    padding="SAME",
    kernel_init=default_init(init_scale),
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
          init_scale: float = 1.0) -> nn.Dense:
  """A dense layer on the last axis: DDPM's ``dense`` and also its ``nin`` (a 1x1 conv)."""
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype,
                  param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
  """DDPM's ResNet block, with the time embedding added between its two convs.

  norm1 -> swish -> conv1 (3x3) -> + temb_proj(swish(temb)) -> norm2 -> swish -> dropout ->
  conv2 (3x3), added to the (projected) input.

  With ``scale_shift`` (improved DDPM's adaptive group norm) the time embedding is projected to
  ``2 * out_ch`` channels ``(scale, shift)`` and the second norm becomes
  ``norm(h) * (1 + scale) + shift`` instead of adding the projection before it.

  The last conv is zero-initialised, so the block starts as its shortcut. When the channel count
  changes the shortcut is a 1x1 conv (``nin_shortcut``) or, with ``conv_shortcut``, a 3x3 conv.
  """

  out_ch: int
  dropout: float = 0.0
  conv_shortcut: bool = False
  scale_shift: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, C]; temb: [B, E]
    c_in = x.shape[-1]
    h = nn.swish(group_norm("norm1", self.dtype, self.param_dtype)(x))
    h = conv3x3(self.out_ch, "conv1", self.dtype, self.param_dtype)(h)  # [B, H, W, out_ch]

    emb_ch = 2 * self.out_ch if self.scale_shift else self.out_ch
    emb = dense(emb_ch, "temb_proj", self.dtype, self.param_dtype)(nn.swish(temb))  # [B, emb_ch]
    emb = emb[:, None, None, :]  # [B, 1, 1, emb_ch]
    norm2 = group_norm("norm2", self.dtype, self.param_dtype)
    if self.scale_shift:
      scale, shift = jnp.split(emb, 2, axis=-1)  # [B, 1, 1, out_ch] each
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + emb)
    h = nn.swish(h)
    h = nn.Dropout(rate=self.dropout)(h, deterministic=not train)
    h = conv3x3(self.out_ch, "conv2", self.dtype, self.param_dtype, init_scale=0.0)(h)

    if c_in != self.out_ch:
      if self.conv_shortcut:
        x = conv3x3(self.out_ch, "conv_shortcut", self.dtype, self.param_dtype)(x)
      else:
        x = dense(self.out_ch, "nin_shortcut", self.dtype, self.param_dtype)(x)
    return x + h  # [B, H, W, out_ch]


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions, with a residual connection.

  GroupNorm, then 1x1 projections q, k, v (each C -> C), ``num_heads`` heads of width
  ``C // num_heads`` with logits scaled by ``head_dim ** -0.5`` (one head reproduces DDPM's
  ``C ** -0.5``), then a zero-initialised 1x1 output projection. The attention itself is
  ``jax.nn.dot_product_attention`` so that backends can use fused kernels; ``implementation``
  is passed through (None: XLA).
  """

  num_heads: int = 1
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape  # [B, H, W, C]
    _check_split("AttnBlock", c, "num_heads", self.num_heads)
    head_dim = c // self.num_heads
    h = group_norm("norm", self.dtype, self.param_dtype)(x)

    def heads(name: str) -> jax.Array:
      y = dense(c, name, self.dtype, self.param_dtype)(h)  # [B, H, W, C]
      return y.reshape(b, hgt * wid, self.num_heads, head_dim)  # [B, HW, N, D]

    q, k, v = heads("q"), heads("k"), heads("v")
    h = jax.nn.dot_product_attention(
      q, k, v, implementation=self.implementation)  # [B, HW, N, D]
    h = h.reshape(b, hgt, wid, c)  # [B, H, W, C]
    h = dense(c, "proj_out", self.dtype, self.param_dtype, init_scale=0.0)(h)
    return x + h


class Downsample(nn.Module):
  """Halve H and W: a stride-2 3x3 conv, or 2x2 average pooling when ``with_conv`` is False.

  Padding is TF's SAME for stride 2 on an even size, i.e. ((0, 1), (0, 1)): no padding before,
  one row/column after, as in DDPM's TF code (PyTorch ports pad one pixel on both sides, a
  half-pixel shift of the sampling grid; both map H -> H / 2).
  """

  with_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]  # x: [B, H, W, C]
    if self.with_conv:
      return nn.Conv(
        c,
        kernel_size=(3, 3),
        strides=(2, 2),
        padding=((0, 1), (0, 1)),
        kernel_init=default_init(1.0),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="conv",
      )(x)  # [B, H/2, W/2, C]
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # [B, H/2, W/2, C]


class Upsample(nn.Module):
  """Double H and W by nearest-neighbour repetition, then (``with_conv``) a 3x3 conv."""

  with_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape  # [B, H, W, C]
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, hgt, 2, wid, 2, c))
    x = x.reshape(b, 2 * hgt, 2 * wid, c)  # [B, 2H, 2W, C]
    if self.with_conv:
      x = conv3x3(c, "conv", self.dtype, self.param_dtype)(x)
    return x
