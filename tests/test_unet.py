"""Tests for the DDPM U-Net: parameter counts (eval_shape, no compile), a tiny model's behaviour.

Anything that compiles uses a tiny network (ch=32, ch_mult=(1, 2), one ResNet block, 8x8 images);
the tests that compile the whole network are marked ``slow``.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax.models import UNet, UNetConfig, timestep_embedding
from diffusion_jax.models.layers import (AttnBlock, Downsample, GroupNorm, ResnetBlock, Upsample,
                                         fourier_embedding)

import oracles  # tests/ is on sys.path under pytest's rootdir conftest


def _unet(**fields) -> UNet:
  return UNet(UNetConfig(**fields))

# The tests run on a couple of CPU cores: skip XLA's expensive backend passes (compile time only).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fun, **kw):
  return jax.jit(fun, compiler_options=_FAST_COMPILE, **kw)


TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, out_ch=3)
B, S, C = 2, 8, 3


def _inputs(batch=B, size=S, channels=C, seed=0):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, size, size, channels))  # [B, H, W, C]
  t = jax.random.randint(kt, (batch,), 0, 1000, dtype=jnp.int32)  # [B]
  return x, t


def _init(model, x, t, **kw):
  return _jit(lambda k: model.init(k, x, t, **kw))(jax.random.key(1))


def _perturb(params, seed=2, scale=0.05):
  """Adds noise to every parameter, so the zero-initialised layers stop hiding the network.

  NumPy noise: drawing it with jax.random would compile a sampler per leaf shape on CPU.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def _random_params(model, *args, seed=3, **kw):
  """Params of the right shapes without compiling ``init``: init-like scales plus noise."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    n = rng.standard_normal(leaf.shape)
    if "scale" in name:
      n = 1.0 + 0.1 * n
    elif "bias" in name:
      n = 0.1 * n
    elif "kernel" in name:
      n = n / math.sqrt(math.prod(leaf.shape[:-1]))
    return jnp.asarray(n, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _count_params(model, size, channels=3):
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


# --------------------------------------------------------------------------------------------
# Parameter counts.
# --------------------------------------------------------------------------------------------


def _count_by_hand(ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch=3, out_ch=3,
                   scale_shift=False, conv_shortcut=False, resamp_with_conv=True):
  """The DDPM architecture's parameter count, walked through independently of the module."""
  def conv(k, a, b):
    return k * k * a * b + b

  def norm(c):
    return 2 * c  # scale and bias

  def res(a, b):
    temb_proj = conv(1, 4 * ch, (2 if scale_shift else 1) * b)
    n = norm(a) + conv(3, a, b) + temb_proj + norm(b) + conv(3, b, b)
    if a != b:
      n += conv(3 if conv_shortcut else 1, a, b)
    return n

  def attn(c):
    return norm(c) + 4 * conv(1, c, c)  # q, k, v, proj_out

  n = conv(1, ch, 4 * ch) + conv(1, 4 * ch, 4 * ch) + conv(3, in_ch, ch)
  skips, c, res_ = [ch], ch, size
  for i, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += res(c, ch * m) + (attn(ch * m) if res_ in attn_resolutions else 0)
      c = ch * m
      skips.append(c)
    if i != len(ch_mult) - 1:
      n += conv(3, c, c) if resamp_with_conv else 0
      skips.append(c)
      res_ //= 2
  n += 2 * res(c, c) + attn(c)
  for i, m in reversed(list(enumerate(ch_mult))):
    for _ in range(num_res_blocks + 1):
      n += res(c + skips.pop(), ch * m) + (attn(ch * m) if res_ in attn_resolutions else 0)
      c = ch * m
    if i != 0:
      n += conv(3, c, c) if resamp_with_conv else 0
      res_ *= 2
  assert not skips
  return n + norm(c) + conv(3, c, out_ch)


def test_param_count_cifar10_is_exact():
  cifar = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), size=32)
  assert _count_by_hand(**cifar) == 35_746_307
  model = UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.1, out_ch=3).make()
  assert _count_params(model, 32) == 35_746_307


def test_param_count_256_is_the_papers_114m():
  model = _unet(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
               out_ch=3)
  n = _count_params(model, 256)
  print(f"DDPM 256x256 U-Net: {n:,} parameters")
  assert n == _count_by_hand(128, (1, 1, 2, 2, 4, 4), 2, (16,), 256)
  assert abs(n - 114e6) / 114e6 < 0.005


@pytest.mark.parametrize("options", [
  dict(),
  dict(resblock_scale_shift=True),
  dict(conv_shortcut=True),
  dict(resamp_with_conv=False),
  dict(ch=64, ch_mult=(1, 2, 3), num_res_blocks=2, attn_resolutions=(8, 2)),
])
@pytest.mark.slow
def test_param_count_matches_hand_count_for_options(options):
  kw = {**TINY, **options}
  model = _unet(**kw)
  expected = _count_by_hand(
    kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["attn_resolutions"], size=S,
    scale_shift=kw.get("resblock_scale_shift", False),
    conv_shortcut=kw.get("conv_shortcut", False),
    resamp_with_conv=kw.get("resamp_with_conv", True))
  assert _count_params(model, S) == expected


def test_class_conditional_adds_a_label_table_with_a_null_row():
  base, cond = _count_params(_unet(**TINY), S), _count_params(_unet(**TINY, num_classes=10), S)
  assert cond - base == (10 + 1) * 4 * TINY["ch"]


# --------------------------------------------------------------------------------------------
# The tiny model: shapes, dtypes, initial output, one step, dropout, labels.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, its initial params, inputs, and one jitted apply shared by the tests."""
  model = _unet(**TINY)
  x, t = _inputs()
  return model, _init(model, x, t)["params"], x, t, _jit(model.apply, static_argnames="train")


@pytest.mark.parametrize("options", [
  dict(),
  dict(num_classes=10),
  dict(resblock_scale_shift=True),
  dict(num_heads=2),
  dict(num_head_channels=16),
  dict(conv_shortcut=True, resamp_with_conv=False),
  dict(dtype=jnp.bfloat16),
], ids=["base", "class_conditional", "scale_shift", "num_heads", "num_head_channels",
       "resampling", "bfloat16"])
@pytest.mark.slow
def test_output_shape_and_dtype_for_each_option(options):
  # Traced with eval_shape (no compile); the options are run for real in the tests below.
  model = _unet(**{**TINY, "out_ch": 6}, **options)
  x, t = _inputs()
  kw = dict(y=jnp.array([0, 10], jnp.int32)) if "num_classes" in options else {}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **kw))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = jax.eval_shape(lambda v: model.apply(v, x, t, **kw), variables)
  assert out.shape == (B, S, S, 6)
  assert out.dtype == jnp.float32


@pytest.mark.slow
def test_combined_options_run():
  model = _unet(**TINY, num_classes=5, resblock_scale_shift=True, num_heads=2)
  x, t = _inputs()
  y = jnp.array([1, 5], jnp.int32)
  params = _random_params(model, x, t, y=y)
  out = _jit(model.apply)({"params": params}, x, t, y)
  chex.assert_shape(out, (B, S, S, 3))
  chex.assert_tree_all_finite(out)
  assert float(jnp.std(out)) > 0


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32(tiny):
  model, params, x, t, apply = tiny
  params = _perturb(params)
  model16 = _unet(**TINY, dtype=jnp.bfloat16)  # float32 params: see the eval_shape test above
  out32 = apply({"params": params}, x, t)
  out16 = _jit(model16.apply)({"params": params}, x, t)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel


@pytest.mark.slow
def test_output_is_zero_at_init_and_moves_after_one_step(tiny):
  model, params, x, t, apply = tiny
  out = apply({"params": params}, x, t)
  assert np.all(np.asarray(out) == 0.0)

  target = jax.random.normal(jax.random.key(3), out.shape)

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x, t) - target) ** 2)

  loss_and_grad = _jit(jax.value_and_grad(loss))

  opt = optax.sgd(0.1)
  value, grads = loss_and_grad(params)
  updates, _ = opt.update(grads, opt.init(params))
  new_params = optax.apply_updates(params, updates)
  new_out = apply({"params": new_params}, x, t)
  assert np.any(np.asarray(new_out) != 0.0)
  assert float(loss_and_grad(new_params)[0]) < float(value)


@pytest.mark.slow
def test_dropout_only_in_training_and_keyed(tiny):
  _, params, x, t, apply = tiny
  v = {"params": _perturb(params)}
  k1, k2 = jax.random.key(10), jax.random.key(11)

  eval_out = apply(v, x, t)
  np.testing.assert_array_equal(apply(v, x, t, train=False, rngs={"dropout": k1}), eval_out)
  train_1 = apply(v, x, t, train=True, rngs={"dropout": k1})
  np.testing.assert_array_equal(apply(v, x, t, train=True, rngs={"dropout": k1}), train_1)
  assert not np.allclose(apply(v, x, t, train=True, rngs={"dropout": k2}), train_1)
  assert not np.allclose(train_1, eval_out)


@pytest.mark.slow
def test_class_labels_change_the_output_and_none_is_the_null_label():
  model = _unet(**TINY, num_classes=3)
  x, t = _inputs()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))["params"]
  assert shapes["label_emb"]["embedding"].shape == (3 + 1, 4 * TINY["ch"])
  params = _random_params(model, x, t)
  apply = _jit(model.apply)

  def out(labels):
    y = None if labels is None else jnp.array(labels, jnp.int32)
    return apply({"params": params}, x, t, y)

  assert not np.allclose(out([0, 0]), out([1, 1]))
  np.testing.assert_array_equal(out(None), out([3, 3]))
  # Each example sees only its own label.
  np.testing.assert_array_equal(out([0, 1])[0], out([0, 2])[0])


# --------------------------------------------------------------------------------------------
# Pieces against float64 NumPy: timestep embedding, attention, ResNet block, resampling.
# --------------------------------------------------------------------------------------------


def _np_group_norm(x, p, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(b, h, w, c) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def _np_conv3x3(x, p):
  """Stride 1, one pixel of zero padding each side."""
  kernel = np.asarray(p["kernel"], np.float64)  # [3, 3, C_in, C_out]
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(xp[:, i:i + h, j:j + w, :] @ kernel[i, j] for i in range(3) for j in range(3))
  return out + np.asarray(p["bias"])


def _np_swish(x):
  return x / (1.0 + np.exp(-x))


def _group_norm_inputs(seed, shape=(3, 5, 4, 64)):
  """float32 inputs whose channels sit far from zero (offsets up to 1000, spreads down to 0.05):
  E[x^2] - E[x]^2 in float32 would lose the variance entirely; the values are float32, and the
  references below are computed from those same values in float64."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  offset = rng.uniform(-1000, 1000, size=c)
  spread = rng.uniform(0.05, 3.0, size=c)
  x = (offset + spread * rng.standard_normal(shape)).astype(np.float32)
  params = {"scale": rng.standard_normal(c).astype(np.float32),
            "bias": rng.standard_normal(c).astype(np.float32)}
  return x, params


def test_group_norm_matches_float64_numpy_far_from_zero():
  x, params = _group_norm_inputs(seed=oracles.new_seed())
  got = _jit(GroupNorm().apply)({"params": params}, jnp.asarray(x))
  expected = _np_group_norm(x.astype(np.float64), params)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4, rtol=1e-4)


def test_group_norm_gradients_match_the_float64_closed_form():
  seed = oracles.new_seed()
  x, params = _group_norm_inputs(seed, shape=(2, 4, 3, 64))
  w = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)

  def loss(p, xx):  # sum(y * w): dL/dy = w
    return jnp.sum(GroupNorm().apply({"params": p}, xx) * w)

  grads, dx = _jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))

  # Closed form, per example and group of n values: with x_hat = (x - mean) / sd and
  # g = dL/dy * scale, dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sd.
  b, h, wd, c = x.shape
  xg = x.astype(np.float64).reshape(b, h, wd, 32, c // 32)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  sd = np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  x_hat = (xg - mean) / sd
  g = (w.astype(np.float64) * params["scale"]).reshape(xg.shape)
  dx_expected = (g - g.mean(axis=(1, 2, 4), keepdims=True)
                 - x_hat * (g * x_hat).mean(axis=(1, 2, 4), keepdims=True)) / sd
  np.testing.assert_allclose(np.asarray(dx), dx_expected.reshape(x.shape),
                             rtol=2e-3, atol=2e-3 * np.abs(dx_expected).max())
  np.testing.assert_allclose(np.asarray(grads["scale"]),
                             (w * x_hat.reshape(x.shape)).sum(axis=(0, 1, 2)), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.asarray(grads["bias"]), w.sum(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)


def test_group_norm_rejects_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match="48 channels .* num_groups=32"):
    GroupNorm().init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_matches_numpy(num_heads):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 64))  # [B, H, W, C]
  block = AttnBlock(num_heads=num_heads)
  params = _random_params(block, jnp.asarray(x, jnp.float32))
  # The layer's mathematics against NumPy: exact contractions (a GPU's default is TF32).
  with jax.default_matmul_precision("highest"):
    got = _jit(block.apply)({"params": params}, jnp.asarray(x, jnp.float32))

  b, h, w, c = x.shape
  d = c // num_heads
  hn = _np_group_norm(x, params["norm"])
  q, k, v = (_np_dense(hn, params[n]).reshape(b, h * w, num_heads, d) for n in "qkv")
  logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, h, w, c)
  expected = x + _np_dense(attended, params["proj_out"])
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resnet_block_matches_numpy(scale_shift):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 4, 4, 32))  # [B, H, W, C_in]
  temb = rng.standard_normal((2, 16))  # [B, E]
  block = ResnetBlock(out_ch=64, scale_shift=scale_shift)
  xj, tj = jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32)
  params = _random_params(block, xj, tj, False)
  with jax.default_matmul_precision("highest"):  # exact contractions, as above
    got = _jit(block.apply, static_argnums=3)({"params": params}, xj, tj, False)

  h = _np_conv3x3(_np_swish(_np_group_norm(x, params["norm1"])), params["conv1"])
  emb = _np_dense(_np_swish(temb), params["temb_proj"])[:, None, None, :]
  if scale_shift:
    scale, shift = emb[..., :64], emb[..., 64:]
    h = _np_group_norm(h, params["norm2"]) * (1 + scale) + shift
  else:
    h = _np_group_norm(h + emb, params["norm2"])
  h = _np_conv3x3(_np_swish(h), params["conv2"])
  expected = _np_dense(x, params["nin_shortcut"]) + h
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dim", [32, 128, 33])
def test_timestep_embedding_matches_float64_formula(dim):
  t = np.array([0, 1, 7, 100, 500, 999])
  half = dim // 2
  i = np.arange(half, dtype=np.float64)
  freqs = np.exp(-np.log(10000.0) * i / (half - 1))
  args = t[:, None].astype(np.float64) * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)

  got = _jit(timestep_embedding, static_argnums=1)(jnp.asarray(t, jnp.int32), dim)
  assert got.shape == (len(t), dim) and got.dtype == jnp.float32
  # float32 arguments of size up to ~1000 carry ~1e-4 absolute error; small t is much tighter.
  np.testing.assert_allclose(np.asarray(got), expected, atol=5e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got)[:3], expected[:3], atol=1e-6, rtol=0)


def test_fourier_embedding_matches_float64_formula():
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  t, w = rng.uniform(0, 1, 7), 16.0 * rng.standard_normal(16)
  args = 2 * np.pi * t[:, None] * w[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)  # [7, 32]
  got = _jit(fourier_embedding)(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32))
  assert got.shape == (7, 32) and got.dtype == jnp.float32
  # float32 arguments up to 2π·|w| ≈ 300 carry ~3e-5 relative error in t and w.
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_fourier_time_embedding_is_fixed_gaussian_and_sees_t_over_time_scale():
  model = _unet(**{**TINY, "ch": 64}, time_embedding="fourier", fourier_scale=16.0,
                time_scale=1000.0)
  x, t = _inputs()
  params = _init(model, x, t)["params"]
  w = np.asarray(params["temb_fourier"])
  assert w.shape == (32,)
  # 32 draws of N(0, 16²): the sample std is within ±50% with probability ≈ 1 − 1e-8.
  assert 8.0 < w.std() < 24.0, w.std()
  params = _perturb(params)
  apply = _jit(model.apply)
  # The features see t / time_scale only: doubling both changes nothing.
  doubled = _unet(**{**TINY, "ch": 64}, time_embedding="fourier", time_scale=2000.0)
  np.testing.assert_allclose(np.asarray(apply({"params": params}, x, t)),
                             np.asarray(_jit(doubled.apply)({"params": params}, x, 2 * t)),
                             atol=1e-5, rtol=1e-5)
  # The frequencies get no gradient (so no update), every other parameter does.
  grads = _jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t) ** 2)))(params)
  assert np.all(np.asarray(grads["temb_fourier"]) == 0)
  assert float(jnp.abs(grads["temb_dense0"]["kernel"]).max()) > 0


def test_timestep_embedding_rejects_tiny_dim():
  with pytest.raises(ValueError, match="dim=2"):
    timestep_embedding(jnp.zeros((2,), jnp.int32), 2)


def test_downsample_is_tf_same_padding_and_halves():
  x = np.random.default_rng(2).standard_normal((1, 8, 6, 4))  # [B, H, W, C]
  layer = Downsample()
  params = _random_params(layer, jnp.asarray(x, jnp.float32))
  with jax.default_matmul_precision("highest"):  # exact against float64, on a GPU too
    out = _jit(layer.apply)({"params": params}, jnp.asarray(x, jnp.float32))
  assert out.shape == (1, 4, 3, 4)
  # TF's SAME at stride 2 on an even size pads nothing before and one pixel after.
  kernel = np.asarray(params["conv"]["kernel"], np.float64)  # [3, 3, C, C]
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  ref = sum(xp[:, i:i + 8:2, j:j + 6:2, :] @ kernel[i, j] for i in range(3) for j in range(3))
  np.testing.assert_allclose(np.asarray(out), ref + np.asarray(params["conv"]["bias"]), atol=1e-5)


def test_upsample_without_conv_is_nearest_neighbour():
  x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(np.float32)
  out = _jit(Upsample(with_conv=False).apply)({}, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(out), np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))


# --------------------------------------------------------------------------------------------
# Errors: every bad value is named in the message.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
  (dict(ch=48), "ch=48"),
  (dict(out_ch=0), "out_ch=0"),
  (dict(out_ch=-3), "out_ch=-3"),
  (dict(ch_mult=()), r"ch_mult=\(\)"),
  (dict(ch_mult=(1, 0)), r"ch_mult=\(1, 0\)"),
  (dict(num_res_blocks=0), "num_res_blocks=0"),
  (dict(dropout=1.0), "dropout=1.0"),
  (dict(num_classes=0), "num_classes=0"),
  (dict(num_heads=0), "num_heads=0"),
  (dict(num_heads=2, num_head_channels=16), "num_head_channels=16"),
  (dict(attn_implementation="flash"), "flash"),
  (dict(dtype=jnp.int32), "int32"),
  (dict(time_embedding="learned"), "learned"),
  (dict(fourier_scale=0.0), "fourier_scale=0.0"),
  (dict(time_scale=float("inf")), "time_scale=inf"),
])
def test_bad_fields_raise_at_construction(bad, match):
  with pytest.raises(ValueError, match=match):
    _unet(**{**TINY, **bad})
  with pytest.raises(ValueError, match=match):
    UNetConfig(**{**TINY, **bad})


def _trace(model, size=S, height=None, batch=B, **kw):
  x = jax.ShapeDtypeStruct((batch, height or size, size, C), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, **kw), x, t)


@pytest.mark.parametrize("fields, size, height, match", [
  (dict(), 10, None, "10x10"),
  (dict(ch_mult=(1, 2, 2)), 8, 6, "6x8"),
  (dict(attn_resolutions=(16,)), 8, None, "16"),
  (dict(attn_resolutions=(3,)), 8, None, "contains 3"),
  (dict(num_heads=3), 8, None, "num_heads=3"),
  (dict(num_head_channels=24), 8, None, "num_head_channels=24"),
])
def test_bad_sizes_raise_at_call(fields, size, height, match):
  model = _unet(**{**TINY, **fields})
  with pytest.raises(ValueError, match=match):
    _trace(model, size, height)


def test_labels_for_unconditional_model_raise():
  with pytest.raises(ValueError, match="num_classes=None"):
    _trace(_unet(**TINY), y=jnp.zeros((B,), jnp.int32))


def test_boundary_shapes_are_asserted():
  model = _unet(**TINY)
  x, t, key = jnp.zeros((B, S, S, C)), jnp.zeros((B,), jnp.int32), jax.random.key(0)
  with pytest.raises(AssertionError):
    jax.eval_shape(model.init, key, x[0], t)  # x of rank 3
  with pytest.raises(AssertionError):
    jax.eval_shape(model.init, key, x, jnp.zeros((B + 1,), jnp.int32))  # t not [B]
  cond = _unet(**TINY, num_classes=4)
  with pytest.raises(AssertionError):
    jax.eval_shape(lambda: cond.init(key, x, t, y=jnp.zeros((B, 1), jnp.int32)))  # y not [B]


# --------------------------------------------------------------------------------------------
# The config at the boundary.
# --------------------------------------------------------------------------------------------


def test_config_from_dict_is_hashable_and_builds_the_module():
  cfg = UNetConfig.from_dict(
    {**TINY, "ch_mult": [1, 2], "attn_resolutions": [4], "dtype": "bfloat16"})
  assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (4,)
  assert cfg.dtype == jnp.bfloat16
  assert hash(cfg) == hash(UNetConfig(**{**TINY, "dtype": jnp.bfloat16}))
  model = cfg.make()
  assert isinstance(model, UNet) and model.config is cfg
  assert UNetConfig() == UNetConfig.from_dict({})
  assert _count_params(UNetConfig().make(), 32) == 35_746_307


def test_config_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['channels'\].*'ch_mult'"):
    UNetConfig.from_dict({"channels": 64})


def test_parameter_tree_uses_ddpm_names():
  x, t = _inputs()
  params = jax.eval_shape(lambda: _unet(**TINY).init(jax.random.key(0), x, t))["params"]
  assert set(params) == {
    "temb_dense0", "temb_dense1", "conv_in",
    "down_0_block_0", "down_0_downsample", "down_1_block_0", "down_1_attn_0",
    "mid_block_1", "mid_attn_1", "mid_block_2",
    "up_1_block_0", "up_1_attn_0", "up_1_block_1", "up_1_attn_1", "up_1_upsample",
    "up_0_block_0", "up_0_block_1",
    "norm_out", "conv_out",
  }
  assert set(params["down_1_block_0"]) == {
    "norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut"}
  assert set(params["mid_attn_1"]) == {"norm", "q", "k", "v", "proj_out"}
