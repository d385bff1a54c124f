"""The TF32 emulation of `--emulate-tf32` (tests/tf32.py) does what it claims: the operands of a
convolution (jax.lax's and flax's Conv) and of a matmul are rounded to TF32 unless HIGHEST is
asked for. The oracles are float64 NumPy contractions of operands rounded by NumPy's own
round-half-even (`np.round` of the 11-bit significand), not by the code under test."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  from tests import tf32
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import tf32

NHWC = ('NHWC', 'HWIO', 'NHWC')
U = 2.0**-24  # float32's unit roundoff


def tf32_oracle(x) -> np.ndarray:
  """float32 values rounded to 11 significant bits, ties to even, in float64 (exact)."""
  m, e = np.frexp(np.asarray(x, np.float64))  # x = m·2^e, 0.5 ≤ |m| < 1
  return np.ldexp(np.round(m * 2.0**11), e - 11)


def conv_oracle(x, w) -> np.ndarray:
  """float64 'SAME' convolution, stride 1, odd kernel, NHWC × HWIO."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, wd = x.shape[1:3]
  return sum(np.einsum('nhwc,co->nhwo', xp[:, a:a + h, b:b + wd], w[a, b])
             for a in range(kh) for b in range(kw))


def _operands(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
  w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
  return x, w


def _check_rounded(y, x, w, bound):
  """`y` is the float32 conv of the TF32-rounded operands, and measurably not the exact one."""
  y = np.asarray(y, np.float64)
  rounded, exact = conv_oracle(tf32_oracle(x), tf32_oracle(w)), conv_oracle(x, w)
  np.testing.assert_array_less(np.abs(y - rounded), bound)
  # The operand roundings (2⁻¹² relative each) move the result by ~100x the float32 bound.
  assert np.max(np.abs(y - exact) / bound) > 20, np.max(np.abs(y - exact) / bound)


def _bound(x, w):
  """Float32 accumulation bound: (terms + 1) · u · Σ|x||w|, per output."""
  terms = np.prod(w.shape[:3])
  return (terms + 1) * U * conv_oracle(np.abs(tf32_oracle(x)), np.abs(tf32_oracle(w))) + 1e-30


def test_rounding_matches_the_oracle_ties_included():
  rng = np.random.default_rng(1)
  bits = rng.integers(0x00800000, 0x7F000000, size=4096, dtype=np.uint32)  # normal, finite
  # Exact ties (low 13 bits 0x1000) with an even and an odd kept bit, of both signs.
  ties = (bits[:64] & np.uint32(0xFFFFC000)) | np.uint32(0x1000)
  ties[::2] |= np.uint32(0x2000)
  bits = np.concatenate([bits, ties, ties | np.uint32(0x80000000)])
  x = bits.view(np.float32)
  np.testing.assert_array_equal(np.asarray(tf32.round_to_tf32(x), np.float64), tf32_oracle(x))


def test_lax_conv_operands_are_rounded_unless_highest():
  x, w = _operands()
  bound = _bound(x, w)
  conv = lambda precision=None: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      x, w, (1, 1), 'SAME', dimension_numbers=NHWC, precision=precision)
  with tf32.emulated():
    _check_rounded(conv(), x, w, bound)
    _check_rounded(jax.jit(lambda: conv())(), x, w, bound)  # pylint: disable=unnecessary-lambda
    highest = np.asarray(conv(jax.lax.Precision.HIGHEST), np.float64)
    with jax.default_matmul_precision('highest'):
      highest_by_config = np.asarray(conv(), np.float64)
  exact = conv_oracle(x, w)
  np.testing.assert_array_less(np.abs(highest - exact), (28 * U) * conv_oracle(abs(x), abs(w)))
  np.testing.assert_array_equal(highest_by_config, highest)


def test_flax_conv_operands_are_rounded():
  x, w = _operands(2)
  layer = nn.Conv(4, (3, 3), padding='SAME')
  params = {'params': {'kernel': jnp.asarray(w), 'bias': jnp.zeros(4)}}
  with tf32.emulated():
    y = layer.apply(params, x)
  _check_rounded(y, x, w, _bound(x, w) + 1e-7)


def test_matmul_operands_are_rounded():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((16, 32)).astype(np.float32)
  b = rng.standard_normal((32, 8)).astype(np.float32)
  with tf32.emulated():
    y = np.asarray(jnp.dot(a, b), np.float64)
  rounded = tf32_oracle(a) @ tf32_oracle(b)
  bound = 33 * U * (np.abs(tf32_oracle(a)) @ np.abs(tf32_oracle(b)))
  np.testing.assert_array_less(np.abs(y - rounded), bound)
  assert np.max(np.abs(y - a.astype(np.float64) @ b) / bound) > 20


def test_gradients_pass_through_the_rounding():
  """d/dw Σ conv(x, w)·g and d/da Σ (a @ b)·c: the rounding has the identity's derivative, so
  they are the (TF32) transposed contractions, as on a GPU, not zero."""
  x, w = _operands(4)
  g = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
  a, b = x.reshape(-1, 5)[:16], w.reshape(-1, 4)[:5]
  c = g.reshape(-1, 4)[:16]

  def conv_loss(w):
    return jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
                   * g)

  def dot_loss(a):
    return jnp.sum(jnp.dot(a, b) * c)

  with tf32.emulated():
    dw = np.asarray(jax.jit(jax.grad(conv_loss))(w), np.float64)
    da = np.asarray(jax.grad(dot_loss)(a), np.float64)
  # Exact: dw[i,j,:,:] = Σ x_shifted ⊗ g; da = c @ bᵀ. TF32 operands: ~2⁻¹¹ relative each.
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  dw_exact = np.stack([np.stack([np.einsum('nhwc,nhwo->co', xp[:, i:i + 8, j:j + 8], g)
                                 for j in range(3)]) for i in range(3)])
  scale = np.stack([np.stack([np.einsum('nhwc,nhwo->co', np.abs(xp[:, i:i + 8, j:j + 8]),
                                        np.abs(g)) for j in range(3)]) for i in range(3)])
  np.testing.assert_array_less(np.abs(dw - dw_exact), 2.0**-10 * scale)
  assert np.max(np.abs(dw)) > 0 and np.max(np.abs(da)) > 0
  np.testing.assert_array_less(np.abs(da - c.astype(np.float64) @ b.T),
                               2.0**-10 * (np.abs(c) @ np.abs(b).T))


@pytest.mark.skipif(tf32.installed(), reason='--emulate-tf32 is on for the whole session')
def test_emulated_restores_the_exact_functions():
  exact = (jax.lax.dot_general, jax.lax.conv_general_dilated)
  with tf32.emulated():
    assert tf32.installed()
  assert (jax.lax.dot_general, jax.lax.conv_general_dilated) == exact
  assert not tf32.installed()
