"""TF32 emulation on the CPU (`pytest --emulate-tf32`, tests/conftest.py).

At XLA's default precision an NVIDIA GPU (Ampere or later) multiplies float32 matrices and
convolves float32 images in TF32: each operand is rounded to a 10-bit mantissa (float32's
exponent), the products and sums are float32. `install()` makes the CPU do the same for the
two contractions that JAX lowers to those kernels:

  * `dot_general` (jnp.dot/matmul/einsum, flax's Dense and DenseGeneral, attention);
  * `conv_general_dilated` (jax.lax.conv*, flax's Conv, which calls `jax.lax.conv_general_dilated`
    at each call; the convolutions of the backward pass, which JAX's transpose rules build with
    the module's own `conv_general_dilated`).

Both float32 operands are rounded unless the call asks for `Precision.HIGHEST` (as its
`precision` argument, per operand for a pair, or through `jax.default_matmul_precision`).
Other dtypes (bfloat16 compute) are left alone. The patch replaces the functions in
`jax._src.lax.lax`, `jax._src.lax.convolution` and `jax.lax`; code that reaches them through
those module attributes at call time (JAX's own numpy and flax) is rounded, a reference taken
before the patch is not.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
from jax._src.lax import convolution as _conv_impl
from jax._src.lax import lax as _lax_impl

# (module, attribute) of every place the patched functions are looked up.
_PLACES = ((_lax_impl, 'dot_general'), (jax.lax, 'dot_general'),
           (_conv_impl, 'conv_general_dilated'), (jax.lax, 'conv_general_dilated'))


@jax.custom_jvp
def _round_float32(x):
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  b = (b + jnp.uint32(0xFFF) + ((b >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


# The rounding is transparent to derivatives, as on a GPU, where the backward pass is the
# transposed contractions (themselves in TF32: JAX builds them with the patched functions).
# Differentiated as written, the integer bitcasts would give every operand a zero gradient.
_round_float32.defjvp(lambda primals, tangents: (_round_float32(*primals), tangents[0]))


def round_to_tf32(x):
  """float32 → the nearest TF32 value (round to nearest, ties to even, on the low 13 bits of
  the mantissa), with the identity's derivative; any other dtype unchanged."""
  x = jnp.asarray(x)
  return _round_float32(x) if x.dtype == jnp.float32 else x


def is_highest(precision) -> bool:
  """Whether a `precision` argument (None: the `jax_default_matmul_precision` in force) asks
  for exact float32 (HIGHEST)."""
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  if isinstance(precision, (tuple, list)):
    return all(is_highest(p) for p in precision)
  return str(precision).lower() in ('highest', 'float32', 'precision.highest', '2')


def _operand_precisions(precision):
  """The precision of the lhs and of the rhs: a pair applies one to each operand."""
  if isinstance(precision, (tuple, list)) and len(precision) == 2:
    return precision[0], precision[1]
  return precision, precision


def _rounding(exact):
  """`exact` (dot_general or conv_general_dilated) with its operands rounded to TF32."""
  signature = inspect.signature(exact)

  @functools.wraps(exact)
  def contraction(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    lhs_precision, rhs_precision = _operand_precisions(bound.arguments.get('precision'))
    if not is_highest(lhs_precision):
      bound.arguments['lhs'] = round_to_tf32(bound.arguments['lhs'])
    if not is_highest(rhs_precision):
      bound.arguments['rhs'] = round_to_tf32(bound.arguments['rhs'])
    return exact(*bound.args, **bound.kwargs)

  contraction.tf32_exact = exact
  return contraction


def installed() -> bool:
  """Whether every place holds the rounding version."""
  return all(hasattr(getattr(m, name), 'tf32_exact') for m, name in _PLACES)


def install() -> None:
  """Rounds the operands of every later dot_general and conv_general_dilated (idempotent)."""
  wrapped = {}
  for module, name in _PLACES:
    current = getattr(module, name)
    if hasattr(current, 'tf32_exact'):
      continue
    if id(current) not in wrapped:
      wrapped[id(current)] = _rounding(current)
    setattr(module, name, wrapped[id(current)])


def uninstall() -> None:
  """Puts the exact functions back."""
  for module, name in _PLACES:
    current = getattr(module, name)
    setattr(module, name, getattr(current, 'tf32_exact', current))


@contextlib.contextmanager
def emulated():
  """TF32 emulation for the block (and what it traces), then as before. Functions jitted and
  traced inside keep their rounding in their cache: jit them inside only."""
  already = installed()
  install()
  try:
    yield
  finally:
    if not already:
      uninstall()
