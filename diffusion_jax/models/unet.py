"""The DDPM U-Net (Ho et al. 2020), in Flax linen, with the options later papers added.

The architecture is the one of the paper's released code (``diffusion_tf/models/unet.py``):

  t -> sinusoidal embedding [B, ch] -> Dense(4ch) -> swish -> Dense(4ch)        = temb [B, 4ch]
       (or random Fourier features of t / time_scale, time_embedding="fourier")
  x -> conv_in (3x3, ch)
  down, for each level i (resolution H / 2**i, width ch * ch_mult[i]):
     num_res_blocks x (ResnetBlock, + AttnBlock if the resolution is in attn_resolutions);
     every output kept as a skip; then a stride-2 Downsample (not after the last level)
  middle: ResnetBlock, AttnBlock, ResnetBlock
  up, for each level i from the last to the first:
     (num_res_blocks + 1) x (concat a skip, ResnetBlock, + AttnBlock at attn_resolutions);
     then Upsample (nearest x2 + 3x3 conv), except at level 0
  -> GroupNorm -> swish -> conv_out (3x3, out_ch, zero-initialised)

A "resolution" is the feature map's height, as in the TF code (``h.shape[1] in attn_resolutions``);
the input need not be square, but its height decides where attention goes.
At the defaults (the CIFAR-10 model) the network has 35,746,307 parameters.

Options beyond DDPM: class conditioning with a null label for classifier-free guidance, improved
DDPM's scale-shift norm in the ResNet blocks, multi-head attention, and bfloat16 compute with
float32 parameters. :class:`UNetConfig` is the typed, hashable description used at the boundary
(trainer, checkpoints); :meth:`UNetConfig.make` builds the module.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (
  GROUPNORM_GROUPS,
  AttnBlock,
  Downsample,
  ResnetBlock,
  Upsample,
  conv3x3,
  dense,
  group_norm,
  fourier_embedding,
  timestep_embedding,
)

Dtype = Any

ATTN_IMPLEMENTATIONS = (None, "xla", "cudnn")
TIME_EMBEDDINGS = ("sinusoidal", "fourier")
HEADS = ("denoiser", "classifier")


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_fields(m: Any) -> None:
  """Raises ValueError for field values no input could make work. ``m``: a UNet or UNetConfig."""
  if not _is_int(m.ch) or m.ch <= 0:
    raise ValueError(f"ch must be a positive int; got ch={m.ch!r}")
  if not _is_int(m.out_ch) or m.out_ch <= 0:
    raise ValueError(f"out_ch must be a positive int; got out_ch={m.out_ch!r}")
  ch_mult = tuple(m.ch_mult) if isinstance(m.ch_mult, Sequence) else ()
  if not ch_mult or not all(_is_int(k) and k > 0 for k in ch_mult):
    raise ValueError(
      f"ch_mult must be a non-empty sequence of positive ints; got ch_mult={m.ch_mult!r}")
  if m.ch % GROUPNORM_GROUPS != 0:
    # conv_in's output (ch channels) is normalised first; every later width (ch * ch_mult[i],
    # and the sums of two such on the skip concatenations) is then a multiple as well.
    raise ValueError(
      f"ch={m.ch} channels cannot be split into GroupNorm's {GROUPNORM_GROUPS} groups; "
      f"ch must be a multiple of {GROUPNORM_GROUPS}"
    )
  if not _is_int(m.num_res_blocks) or m.num_res_blocks < 1:
    raise ValueError(
      f"num_res_blocks must be an int >= 1; got num_res_blocks={m.num_res_blocks!r}")
  if (not isinstance(m.attn_resolutions, Sequence)
      or not all(_is_int(r) and r > 0 for r in m.attn_resolutions)):
    raise ValueError(
      f"attn_resolutions must be a sequence of positive ints; "
      f"got attn_resolutions={m.attn_resolutions!r}")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1); got dropout={m.dropout!r}")
  if m.num_classes is not None and (not _is_int(m.num_classes) or m.num_classes < 1):
    raise ValueError(
      f"num_classes must be None or an int >= 1; got num_classes={m.num_classes!r}")
  if not _is_int(m.num_heads) or m.num_heads < 1:
    raise ValueError(f"num_heads must be an int >= 1; got num_heads={m.num_heads!r}")
  if m.num_head_channels is not None:
    if not _is_int(m.num_head_channels) or m.num_head_channels < 1:
      raise ValueError(
        f"num_head_channels must be None or an int >= 1; "
        f"got num_head_channels={m.num_head_channels!r}")
    if m.num_heads != 1:
      raise ValueError(
        f"set either num_heads or num_head_channels, not both; got num_heads={m.num_heads}, "
        f"num_head_channels={m.num_head_channels}"
      )
  for name in ("dtype", "param_dtype"):
    value = getattr(m, name)
    try:
      floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      raise ValueError(
        f"{name} must be a floating dtype such as float32 or bfloat16; got {name}={value!r}")
  if m.head not in HEADS:
    raise ValueError(f"head must be one of {HEADS}; got head={m.head!r}")
  if m.time_embedding not in TIME_EMBEDDINGS:
    raise ValueError(
      f"time_embedding must be one of {TIME_EMBEDDINGS}; got time_embedding={m.time_embedding!r}")
  for name in ("fourier_scale", "time_scale"):
    value = getattr(m, name)
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be a finite number > 0; got {name}={value!r}")
  if m.attn_implementation not in ATTN_IMPLEMENTATIONS:
    raise ValueError(
      f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}; got {m.attn_implementation!r}"
    )


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Typed, hashable description of a :class:`UNet`; the one place its fields are written.

  Sequences are stored as tuples and dtypes as ``numpy.dtype`` (strings such as ``"bfloat16"``
  are accepted), so a config can be a static argument or a dict key. Invalid values raise
  ``ValueError`` on construction. Defaults are the paper's CIFAR-10 model.

  Attributes:
    ch: base width; level i has ``ch * ch_mult[i]`` channels; the time embedding has ``4 * ch``.
    out_ch: output channels (3 to predict the noise of an RGB image; 6 with learned variances).
    ch_mult: width multipliers, one per resolution level (input size halves between levels).
    num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map heights at which self-attention follows each ResNet block.
    dropout: dropout rate inside the ResNet blocks (active only with ``train=True``).
    resamp_with_conv: 3x3 convs in Downsample/Upsample (else average pooling / plain nearest).
    conv_shortcut: 3x3 instead of 1x1 convs on the ResNet shortcut when the width changes.
    num_classes: if set, class-conditional; label ``num_classes`` is the null label.
    resblock_scale_shift: improved DDPM's ``norm(h) * (1 + scale) + shift`` in the ResNet blocks.
    num_heads: attention heads (each of width ``C // num_heads``).
    num_head_channels: alternatively, the width of each head (heads = C // num_head_channels).
    attn_implementation: passed to ``jax.nn.dot_product_attention`` (None, 'xla' or 'cudnn').
    dtype: compute dtype (e.g. ``jnp.bfloat16``); the output is always float32.
    param_dtype: parameter dtype.
    time_embedding: "sinusoidal" (DDPM's, of the timestep index) or "fourier": random Fourier
      features ``[sin(2π s w), cos(2π s w)]`` of ``s = t / time_scale`` with fixed frequencies
      ``w ~ N(0, fourier_scale²)`` (``ch // 2`` of them; a parameter that gets no gradient).
    fourier_scale: the standard deviation of the Fourier frequencies (score_sde's 16).
    time_scale: the number of timesteps of the diffusion, so that ``s`` lies in [0, 1).
    head: "denoiser" (the U-Net, ``[B, H, W, out_ch]``) or "classifier": the downsampling
      path and the middle only, then GroupNorm, swish, a spatial mean and a dense layer to
      ``out_ch`` logits, ``[B, out_ch]`` (a noise-conditional classifier, as ADM's encoder
      half of the U-Net; here with a mean instead of attention pooling).
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conv_shortcut: bool = False
  num_classes: int | None = None
  resblock_scale_shift: bool = False
  num_heads: int = 1
  num_head_channels: int | None = None
  attn_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  time_embedding: str = "sinusoidal"
  fourier_scale: float = 16.0
  time_scale: float = 1000.0
  head: str = "denoiser"

  def __post_init__(self):
    _check_fields(self)
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

  @classmethod
  def from_dict(cls, mapping: Mapping[str, Any]) -> UNetConfig:
    """A config from a plain mapping (e.g. ``dict(config.model)``); unknown keys are errors."""
    mapping = dict(mapping)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
      raise ValueError(f"unknown UNetConfig keys {unknown}; allowed keys are {allowed}")
    return cls(**mapping)

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON-able values (tuples as lists, dtypes by name): the inverse of
    :meth:`from_dict`."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d.update(ch_mult=list(self.ch_mult), attn_resolutions=list(self.attn_resolutions),
             dtype=self.dtype.name, param_dtype=self.param_dtype.name)
    return d

  def make(self) -> UNet:
    """The Flax module this config describes."""
    return UNet(self)


class UNet(nn.Module):
  """The DDPM U-Net described by ``config`` (a :class:`UNetConfig`, whose fields are documented
  there). ``UNet(UNetConfig())`` is the paper's CIFAR-10 model (35.7M parameters)."""

  config: UNetConfig = UNetConfig()

  @property
  def num_classes(self) -> int | None:
    return self.config.num_classes

  def _heads(self, channels: int) -> int:
    if self.config.num_head_channels is None:
      return self.config.num_heads
    return channels // self.config.num_head_channels

  def _check_sizes(self, height: int, width: int) -> None:
    """Raises ValueError when the input size does not fit the architecture."""
    levels = len(self.config.ch_mult)
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
      raise ValueError(
        f"input size {height}x{width} cannot be halved {levels - 1} times "
        f"(len(ch_mult)={levels}): H and W must be multiples of {factor}"
      )
    resolutions = tuple(height // 2**i for i in range(levels))
    for r in self.config.attn_resolutions:
      if r not in resolutions:
        raise ValueError(
          f"attn_resolutions contains {r}, which never occurs for a {height}x{width} input; "
          f"the feature-map heights are {resolutions}"
        )
    # Attention at the listed resolutions, and always in the middle (the last level's width).
    attn_levels = {i for i, r in enumerate(resolutions) if r in self.config.attn_resolutions}
    attn_levels.add(levels - 1)
    for i in sorted(attn_levels):
      c = self.config.ch * self.config.ch_mult[i]
      if self.config.num_head_channels is not None and c % self.config.num_head_channels:
        raise ValueError(
          f"num_head_channels={self.config.num_head_channels} does not divide the {c} channels "
          f"of the attention at resolution {resolutions[i]}"
        )
      if self.config.num_head_channels is None and c % self.config.num_heads:
        raise ValueError(
          f"num_heads={self.config.num_heads} does not divide the {c} channels "
          f"of the attention at resolution {resolutions[i]}"
        )

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    """Predicts (by default) the noise in ``x`` at timesteps ``t``.

    Args:
      x: ``[B, H, W, C]`` images; H and W multiples of ``2 ** (len(ch_mult) - 1)``.
      t: ``[B]`` timesteps, 0-indexed (int32; floats are accepted for respaced schedules).
      y: ``[B]`` int labels in ``[0, num_classes]`` (``num_classes`` = null label), or None
        (the null label for all, when the model is class-conditional).
      train: enables dropout; then ``rngs={'dropout': key}`` must be given to ``apply``.

    Returns:
      ``[B, H, W, out_ch]`` float32.
    """
    chex.assert_rank(x, 4)
    b, height, width, _ = x.shape  # [B, H, W, C]
    chex.assert_shape(t, (b,))
    if y is not None:
      if self.config.num_classes is None:
        raise ValueError("got labels y, but the model is unconditional (num_classes=None)")
      chex.assert_shape(y, (b,))
    self._check_sizes(height, width)

    dt, pdt = self.config.dtype, self.config.param_dtype
    levels = len(self.config.ch_mult)
    block = dict(
      dropout=self.config.dropout,
      conv_shortcut=self.config.conv_shortcut,
      scale_shift=self.config.resblock_scale_shift,
      dtype=dt,
      param_dtype=pdt,
    )

    def res(out_ch: int, name: str) -> ResnetBlock:
      return ResnetBlock(out_ch, name=name, **block)

    def attn(channels: int, name: str) -> AttnBlock:
      return AttnBlock(
        num_heads=self._heads(channels),
        implementation=self.config.attn_implementation,
        dtype=dt,
        param_dtype=pdt,
        name=name,
      )

    # Timestep (and label) embedding.
    if self.config.time_embedding == "fourier":
      w = self.param("temb_fourier", nn.initializers.normal(self.config.fourier_scale),
                     (self.config.ch // 2,), jnp.float32)  # [ch / 2], fixed
      s = t.astype(jnp.float32) / self.config.time_scale  # [B] in [0, 1)
      temb = fourier_embedding(s, jax.lax.stop_gradient(w))  # [B, ch] float32
    else:
      temb = timestep_embedding(t, self.config.ch)  # [B, ch] float32
    temb = dense(4 * self.config.ch, "temb_dense0", dt, pdt)(temb)
    temb = dense(4 * self.config.ch, "temb_dense1", dt, pdt)(nn.swish(temb))  # [B, 4ch]
    if self.config.num_classes is not None:
      if y is None:
        y = jnp.full((b,), self.config.num_classes, dtype=jnp.int32)  # the null label
      label_emb = nn.Embed(
        self.config.num_classes + 1, 4 * self.config.ch, embedding_init=nn.initializers.normal(1.0),
        dtype=dt, param_dtype=pdt, name="label_emb",
      )
      temb = temb + label_emb(y)  # [B, 4ch]

    # Downsampling.
    hs = [conv3x3(self.config.ch, "conv_in", dt, pdt)(x.astype(dt))]  # [B, H, W, ch]
    for i in range(levels):
      c = self.config.ch * self.config.ch_mult[i]
      for j in range(self.config.num_res_blocks):
        h = res(c, f"down_{i}_block_{j}")(hs[-1], temb, train)  # [B, H/2**i, W/2**i, c]
        if h.shape[1] in self.config.attn_resolutions:
          h = attn(c, f"down_{i}_attn_{j}")(h)
        hs.append(h)
      if i != levels - 1:
        down = Downsample(self.config.resamp_with_conv, dt, pdt, name=f"down_{i}_downsample")
        hs.append(down(hs[-1]))  # [B, H/2**(i+1), W/2**(i+1), c]

    # Middle.
    h = hs[-1]  # [B, H/2**(L-1), W/2**(L-1), ch * ch_mult[-1]]
    c = h.shape[-1]
    h = res(c, "mid_block_1")(h, temb, train)
    h = attn(c, "mid_attn_1")(h)
    h = res(c, "mid_block_2")(h, temb, train)
    if self.config.head == "classifier":
      h = nn.swish(group_norm("norm_out", dt, pdt)(h))
      h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # [B, ch * ch_mult[-1]]
      return dense(self.config.out_ch, "logits", dt, pdt)(h).astype(jnp.float32)  # [B, out_ch]

    # Upsampling: each block takes one skip, so each level uses num_res_blocks + 1 of them.
    for i in reversed(range(levels)):
      c = self.config.ch * self.config.ch_mult[i]
      for j in range(self.config.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)  # [B, H/2**i, W/2**i, c + c_skip]
        h = res(c, f"up_{i}_block_{j}")(h, temb, train)  # [B, H/2**i, W/2**i, c]
        if h.shape[1] in self.config.attn_resolutions:
          h = attn(c, f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(self.config.resamp_with_conv, dt, pdt, name=f"up_{i}_upsample")(h)
    assert not hs, f"{len(hs)} skip connections left unused"

    # Output head.
    h = nn.swish(group_norm("norm_out", dt, pdt)(h))
    h = conv3x3(self.config.out_ch, "conv_out", dt, pdt, init_scale=0.0)(h)  # [B, H, W, out_ch]
    return h.astype(jnp.float32)
