"""What training must do, each checked against numbers derived here, not by the library.

Every test here was once run against a library with the behaviour broken on purpose (the
fault is named in each docstring) and failed:
  * training learns (the gradient's sign flipped);
  * the optimizer clips the global norm (clip_by_global_norm(1e9));
  * the warm-up learning rates (a warm-up twice as long);
  * the label-dropout rate (half the configured rate), and the step's use of the drop draw
    (the batch's label always);
  * checkpoint pruning keeps `keep_checkpoints` (pruning off);
  * a bfloat16 step follows the float32 one (computed in float32; outputs 10% off);
  * the digits classifier reaches its accuracy on the held-out digits.
"""

import collections
import functools
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.storage import checkpointing
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import schedules
from diffusion_jax.training import step as step_lib
from diffusion_jax.models import digits_classifier
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.runtime.parallel import AXIS
from diffusion_jax.spec import OptimizerConfig
from diffusion_jax.training.state import TrainState

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles
import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 100


def _model(dtype=jnp.float32):
  """The tiny config's U-Net (configs/tiny.py)."""
  return UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, out_ch=1, dtype=dtype).make()


def _init_params(model):
  return model.init({'params': jax.random.PRNGKey(1)}, jnp.zeros((1, 8, 8, 1)),
                    jnp.zeros((1,), jnp.int32))['params']


# ------------------------------------------------------------------------------------------
# Training learns; its learning rates are the warm-up's.
# ------------------------------------------------------------------------------------------


def _heldout_loss(model, diffusion, params, images, t, noise) -> np.ndarray:
  """Per-example ε-MSE `[N]` of `params` on fixed images, timesteps and noise."""
  x_t = gd.q_sample(diffusion, images, t, noise)
  eps = model.apply({'params': params}, x_t, t, train=False)
  return np.asarray(jnp.mean((eps - noise) ** 2, axis=(1, 2, 3)), np.float64)


@pytest.mark.slow
def test_a_short_run_lowers_the_heldout_loss_and_follows_the_warmup():
  """Fault: the gradient's sign flipped in the step (the loss climbs).

  80 Adam steps of the tiny U-Net on the 1,500 training digits; the loss of the EMA and of
  the params on 256 held-out digits, at fixed timesteps and noise, against the initial
  params' (whose zero output layer predicts ε = 0, a loss of E[ε²] ≈ 1). The paired
  difference must be more than 10 standard errors and a third of the initial loss.
  The step's reported learning rate is lr·min(1, n/warmup), written out here.
  """
  rng, seed = oracles.new_rng()
  lr, warmup, steps, batch = 2e-3, 20, 80, 64
  model = _model()
  diffusion = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  opt = OptimizerConfig(learning_rate=lr, warmup_steps=warmup, grad_clip=1.0)
  tx = opt.make()
  cfg = step_lib.StepConfig(ema_decay=0.99, ema_warmup=True)
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=diffusion, tx=tx,
                              learning_rate_fn=opt.learning_rate_schedule(), cfg=cfg)
  update = step_lib.data_parallel_step(step_fn, helpers.mesh(8))
  params0 = _init_params(model)
  state = TrainState.create(params0, tx, jax.random.PRNGKey(seed))
  params0 = jax.tree.map(np.array, params0)  # the update donates the state's buffers

  train_images, _ = helpers.digits('train')
  x_train = train_images.astype(np.float32) / 127.5 - 1.0
  rates = {}
  for n in range(steps):
    idx = rng.integers(0, len(x_train), batch)
    state, metrics = update(state, dict(image=jnp.asarray(x_train[idx]),
                                        label=jnp.zeros((batch,), jnp.int32)))
    rates[n] = float(metrics['learning_rate'])   # the rate of update n (state.step = n)
  for n in (0, 1, 5, 10, 19, 20, 21, 50, 79):
    np.testing.assert_allclose(rates[n], lr * min(1.0, n / warmup), rtol=1e-6, atol=1e-12,
                               err_msg=f'learning rate of update {n}')

  test_images, _ = helpers.digits('test')
  x = jnp.asarray(np.resize(test_images, (256, 8, 8, 1)).astype(np.float32) / 127.5 - 1.0)
  t = jnp.asarray(rng.integers(0, T, 256), jnp.int32)
  noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  before = _heldout_loss(model, diffusion, params0, x, t, noise)
  for name, params in (('ema', state.ema_params), ('params', state.params)):
    after = _heldout_loss(model, diffusion, params, x, t, noise)
    diff = before - after                                    # [256] paired
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(name, 'held-out loss', before.mean(), '->', after.mean(), 'se', se)
    assert diff.mean() > 10 * se, (name, before.mean(), after.mean(), se)
    assert after.mean() < 0.67 * before.mean(), (name, before.mean(), after.mean())


def test_warmup_learning_rates_are_the_linear_ramp_in_the_optimizer_updates():
  """Fault: a warm-up twice as long as configured.

  A constant gradient g makes every Adam update −lr_n·g/(|g| + ε) exactly (m̂ = g, v̂ = g²),
  so the updates themselves give the optimizer's learning rate at each step n; they must be
  lr·min(1, n/warmup) (optax counts from 0, so the first update has rate 0)."""
  lr, warmup = 1e-3, 10
  tx = OptimizerConfig(learning_rate=lr, warmup_steps=warmup, grad_clip=0).make()
  params = {'w': jnp.zeros((3,))}
  g = {'w': jnp.asarray([0.5, -2.0, 1.0])}
  opt_state = tx.init(params)
  step = jax.jit(tx.update)
  for n in range(16):
    updates, opt_state = step(g, opt_state, params)
    direction = np.asarray(g['w'], np.float64) / (np.abs(g['w']) + 1e-8)  # g / (|g| + ε)
    rate = -np.asarray(updates['w'], np.float64) / direction
    np.testing.assert_allclose(rate, lr * min(1.0, n / warmup), rtol=1e-5, atol=1e-12,
                               err_msg=f'update {n}')


# ------------------------------------------------------------------------------------------
# Clipping.
# ------------------------------------------------------------------------------------------


def _adam_clipped(grads, lr, clip, b1=0.9, b2=0.999, eps=1e-8):
  """Float64 NumPy Adam with global-norm clipping: the update of each gradient in turn."""
  m = v = np.zeros_like(grads[0])
  out = []
  for n, g in enumerate(grads, start=1):
    norm = np.sqrt(np.sum(g ** 2))
    g = g * min(1.0, clip / norm)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1 ** n)) / (np.sqrt(v / (1 - b2 ** n)) + eps))
  return out


def test_grad_clip_bounds_a_huge_gradient_to_the_closed_form():
  """Fault: clip_by_global_norm(1e9) (clipping a no-op).

  Adam's first update is sign-like whatever the norm, so the clip shows from the second: a
  gradient of norm ~0.5, then one of norm ~10⁴. Clipped to norm 1 the two weigh alike in
  Adam's moments; unclipped the second swamps the first. The optimizer's updates must equal
  the float64 closed form with the clip."""
  rng, seed = oracles.new_rng()
  lr, clip = 1e-3, 1.0
  g1 = rng.standard_normal(12) * 0.5 / np.sqrt(12)
  g2 = rng.standard_normal(12) * 1e4
  tx = OptimizerConfig(learning_rate=lr, warmup_steps=0, grad_clip=clip).make()
  params = {'w': jnp.zeros((12,))}
  opt_state = tx.init(params)
  got = []
  for g in (g1, g2):
    updates, opt_state = tx.update({'w': jnp.asarray(g, jnp.float32)}, opt_state, params)
    got.append(np.asarray(updates['w'], np.float64))
  want = _adam_clipped([g1, g2], lr, clip)
  unclipped = _adam_clipped([g1, g2], lr, 1e30)
  assert np.max(np.abs(want[1] - unclipped[1])) > 1e-4   # the test can tell them apart
  for n in range(2):
    np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-9, err_msg=f'update {n}')


# ------------------------------------------------------------------------------------------
# Label dropout.
# ------------------------------------------------------------------------------------------


class _LabelRecorder:
  """A stand-in for the U-Net with its `apply` signature: ε̂ = w·x_t (repeated over
  `out_ch`), and the labels `y` of every call sent to the host with the device's index, so
  a test sees the labels the model is given inside the step."""

  def __init__(self, out_ch: int):
    self.out_ch = out_ch
    self.calls = []   # (device index, labels [b]) per call and device

  def _record(self, device, y):
    self.calls.append((int(device), np.asarray(y)))

  def apply(self, variables, x, t, y=None, train=False, rngs=None):
    del t, train, rngs
    jax.debug.callback(self._record, jax.lax.axis_index(AXIS), y)
    return jnp.tile(variables['params']['w'] * x, (1, 1, 1, self.out_ch))


def test_label_dropout_rate_is_within_its_binomial_interval():
  """Faults: half the configured label-dropout rate; a step that ignores the drop draw (the
  batch's label always).

  One train step of a class-conditional config (its StepConfig built through the spec, as
  the trainer builds it) with label_dropout p = 0.1, on n = 40,000 examples over 8 devices,
  with a stand-in model that reports the labels it is given. Those labels must be the null
  label (num_classes) exactly where the step's per-example drop draw says and the batch's
  label everywhere else. The number of null labels must lie within 5 standard deviations
  √(n·p(1−p)) of the binomial mean n·p; the counts of two disjoint halves, each of variance
  (n/2)·p(1−p), must differ by less than 5 standard deviations of their difference, whose
  variance is the sum of theirs, n·p(1−p)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.spec import ExperimentSpec  # pylint: disable=g-import-not-at-top
  rng, seed = oracles.new_rng()
  config = tiny.get_config()
  config.model.class_conditional = True
  config.training.label_dropout = 0.1
  info = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500})
  cfg = step_lib.StepConfig.from_spec(ExperimentSpec.from_config(config, info))
  assert cfg.num_classes == 10 and cfg.label_dropout == 0.1
  n, p, devices = 40_000, 0.1, 8
  diffusion = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  model = _LabelRecorder(cfg.parameterization.out_channels(1))
  tx = optax.sgd(1.0)
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=diffusion, tx=tx,
                              learning_rate_fn=optax.constant_schedule(1.0), cfg=cfg)
  state = TrainState.create({'w': jnp.ones((), jnp.float32)}, tx, jax.random.PRNGKey(seed))
  labels = rng.integers(0, 10, n).astype(np.int32)
  step_fn = step_lib.data_parallel_step(step_fn, helpers.mesh(devices))
  jax.block_until_ready(step_fn(state, dict(image=jnp.zeros((n, 8, 8, 1), jnp.float32),
                                            label=jnp.asarray(labels))))
  jax.effects_barrier()
  b = n // devices
  got = np.full((n,), -1, np.int32)
  assert sorted({d for d, _ in model.calls}) == list(range(devices)), len(model.calls)
  for device, y in model.calls:   # device d holds examples d·b … (d + 1)·b − 1
    assert y.shape == (b,), y.shape
    got[device * b:(device + 1) * b] = y
  for device, y in model.calls:   # every call of a device was given the same labels
    np.testing.assert_array_equal(y, got[device * b:(device + 1) * b])

  # The step's draw: its key is fold_in(rng, step), each example's by its global index.
  _, _, _, drop = jax.jit(lambda k, i: step_lib._per_example_randomness(  # pylint: disable=protected-access
      k, None, i, (n, 1, 1, 1), diffusion, cfg))(
          jax.random.fold_in(jax.random.PRNGKey(seed), 0), jnp.arange(n))
  drop = np.asarray(drop)
  np.testing.assert_array_equal(got, np.where(drop, 10, labels),
                                err_msg='the labels the model was given in the step')
  null = got == 10
  sd = np.sqrt(n * p * (1 - p))
  assert abs(null.sum() - n * p) < 5 * sd, (null.sum(), n * p, sd)
  assert abs(int(null[: n // 2].sum()) - int(null[n // 2:].sum())) < 5 * sd, (
      null[: n // 2].sum(), null[n // 2:].sum(), sd)


# ------------------------------------------------------------------------------------------
# Pruning.
# ------------------------------------------------------------------------------------------


def test_manager_keeps_exactly_keep_checkpoints(tmp_path):
  """Fault: pruning off (max_to_keep=None in make_manager). Six saves, keep 2: 5 and 6."""
  tx = optax.sgd(1.0)
  manager = checkpointing.make_manager(tmp_path / 'checkpoints', keep=2)
  for step in range(1, 7):
    state = TrainState.create({'w': np.full((4,), float(step), np.float32)}, tx,
                              jax.random.PRNGKey(0))
    checkpointing.save(manager, step, state.replace(step=np.int32(step)))
    manager.wait_until_finished()
  manager.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['5', '6']


@pytest.mark.slow
def test_trainer_prunes_to_keep_checkpoints_and_writes_the_grid_at_its_steps(child_env,
                                                                             tmp_path):
  """Faults: pruning off in the trainer; the sample grid written at the wrong steps.

  The tiny config for 5 steps, a checkpoint every step, keep 2, a grid of 8 samples (one
  per device) every 2 steps: checkpoints 4 and 5 remain; grids at steps 2, 4 and 5 (the
  last), each 8 digits of 8×8 in the grid's layout."""
  workdir = tmp_path / 'w'
  result = subprocess.run(workdirs.train_cmd(
      child_env['data_dir'], workdir, '--config.training.num_train_steps=5',
      '--config.training.checkpoint_every_steps=1', '--config.training.keep_checkpoints=2',
      '--config.training.sample_every_steps=2', '--config.training.num_samples=8',
      '--config.training.sampler=ddim', '--config.training.sample_steps=4'),
      env=child_env['env'], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == ['4', '5']
  assert sorted(os.listdir(workdir / 'samples')) == [
      'step_00000002.png', 'step_00000004.png', 'step_00000005.png']
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import images as images_lib
  want = images_lib.make_grid(np.zeros((8, 8, 8, 1), np.uint8)).shape[:2]
  with Image.open(workdir / 'samples' / 'step_00000004.png') as im:
    assert im.size[::-1] == want, (im.size, want)


@pytest.mark.slow
def test_several_steps_per_call_train_and_resume_as_one_step_per_call(child_env, tmp_path):
  """`training.steps_per_call` = 2 (a lax.scan of two steps per dispatch), 4 steps, then resumed
  to 6, against one step per call for 6: checkpoint 6 the same up to float32 rounding, each
  leaf of the parameters, EMA and Adam's two moments at its own scale (the step, counts and
  data position exactly), and the log at the cadence asked for. A checkpoint that is not a
  multiple of steps_per_call is one error line on resume, and nothing is lost."""
  common = ('--config.training.checkpoint_every_steps=2', '--config.training.log_every_steps=2',
            '--config.training.keep_checkpoints=5')

  def train(workdir, *overrides):
    return subprocess.run(workdirs.train_cmd(child_env['data_dir'], workdir, *common,
                                             *overrides),
                          env=child_env['env'], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)

  scanned, plain = tmp_path / 'k2', tmp_path / 'k1'
  first = train(scanned, '--config.training.steps_per_call=2',
                '--config.training.num_train_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = train(scanned, '--config.training.steps_per_call=2',
                  '--config.training.num_train_steps=6')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from checkpoint 4' in resumed.stderr
  logged = [int(n) for n in re.findall(r'step (\d+)/\d+ ', first.stderr + resumed.stderr)]
  assert logged == [2, 4, 6], logged
  reference = train(plain, '--config.training.num_train_steps=6')
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert sorted(os.listdir(scanned / 'checkpoints'), key=int) == ['2', '4', '6']
  # Not bit for bit: XLA compiles the scan's body with other fusions, which round differently.
  # Measured here after 6 steps of the tiny model: a leaf moves by 2e-5 of its own largest
  # value, 1e-3 where its gradient nearly cancels. The leaves whose gradient is zero in exact
  # arithmetic (attention key biases; biases and time-embedding projections ahead of a
  # GroupNorm of one channel per group) hold rounding noise: up to 1e-9 of the largest first
  # moment and 2e-18 of the largest second moment, which Adam's ε turns into parameter steps
  # of up to 3e-5 of the largest parameter. rtol and the floors clear all of it 19 times or
  # more; Adam's second moments 10% off fail 129 of their 144 leaves (none under the former
  # single atol of 5e-4), and feeding a call's batches in the wrong order moves leaves by 1e-2.
  workdirs.assert_same_checkpoint(plain, scanned, 6, rtol=1e-3,
                                  floors=dict(params=5e-4, ema=5e-4, mu=1e-6, nu=1e-12))

  before = sorted(os.listdir(scanned / 'checkpoints'), key=int)
  odd = train(scanned, '--config.training.steps_per_call=4', '--config.training.num_train_steps=8',
              '--config.training.checkpoint_every_steps=4', '--config.training.log_every_steps=4')
  assert odd.returncode != 0
  oracles.assert_one_line_error(odd.stderr.strip().splitlines()[-1], 'checkpoint 6',
                                'multiple of training.steps_per_call=4')
  assert sorted(os.listdir(scanned / 'checkpoints'), key=int) == before


# ------------------------------------------------------------------------------------------
# bfloat16.
# ------------------------------------------------------------------------------------------


def _matmul_operand_dtypes(jaxpr) -> list[str]:
  """The operand dtypes of every convolution and dot product in `jaxpr` and the jaxprs nested
  in it (jit, shard_map, scan, custom gradients), one string per equation, e.g. 'bfloat16'."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      found.append(','.join(sorted({str(v.aval.dtype) for v in eqn.invars})))
  for sub in jax_core.subjaxprs(jaxpr):
    found.extend(_matmul_operand_dtypes(sub))
  return found


@pytest.mark.slow
def test_a_bfloat16_step_follows_the_float32_step():
  """Faults: a bfloat16 step that computes in float32; one whose outputs are 10% off.

  One SGD(1) step of the same params on the same digits batch with compute dtype float32
  and bfloat16. The bfloat16 step's program (its jaxpr) must run every convolution and dot
  product, forward and backward, on bfloat16 operands (the float32 step's on float32 ones),
  and its params stay float32. Its update must then follow float32's as closely as
  bfloat16's 8-bit significand allows: each rounding is a relative error of at most
  u = 2⁻⁸ (0.39%), and the update's, compounded over the forward and backward passes
  through the U-Net's layers, is 3–4u in relative norm (seven seeds); the bound is 8u
  (3.1%), where outputs 10% off give 30u. The loss, of small outputs against unit noise,
  moves by less than 0.1u; the bound is u. The update must still differ by more than 2⁻¹⁶
  relative (1/100 of a bfloat16 rounding, 500 float32 ones; a float32 step differs by 0)."""
  seed = oracles.new_seed()
  rng = np.random.default_rng(seed)
  images, _ = helpers.digits('train')
  batch = dict(image=jnp.asarray(images[rng.integers(0, len(images), 32)] / 127.5 - 1.0,
                                 jnp.float32), label=jnp.zeros((32,), jnp.int32))
  diffusion = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  params = _init_params(_model())
  # Perturb the zero-initialised head so that every parameter gets a gradient.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  tx = optax.sgd(1.0)
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    step_fn = functools.partial(step_lib.train_step, model=_model(dtype), diffusion=diffusion,
                                tx=tx, learning_rate_fn=optax.constant_schedule(1.0),
                                cfg=step_lib.StepConfig(ema_decay=0.9))
    state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(seed))
    mesh = helpers.mesh(8)
    # The program data_parallel_step runs: the step under shard_map, batch split over 'data'.
    sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                            out_specs=(P(), P()))
    placed = (jax.device_put(state, NamedSharding(mesh, P())),
              jax.device_put(batch, NamedSharding(mesh, P(AXIS))), jax.random.PRNGKey(0))
    operands = _matmul_operand_dtypes(jax.make_jaxpr(sharded)(*placed).jaxpr)
    # The backward of the attention's float32 softmax multiplies it with bfloat16 values.
    allowed = {'float32'} if dtype == jnp.float32 else {'bfloat16', 'bfloat16,float32'}
    assert len(operands) > 100 and set(operands) <= allowed, collections.Counter(operands)
    new, metrics = step_lib.data_parallel_step(step_fn, mesh)(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                         new.params, params)
    out[dtype] = float(metrics['loss']), np.concatenate(
        [d.ravel() for d in jax.tree.leaves(delta)])
  (l32, d32), (l16, d16) = out[jnp.float32], out[jnp.bfloat16]
  u = 2.0 ** -8
  loss_err = abs(l16 - l32) / abs(l32)
  update_err = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
  print('loss', l32, l16, 'relative error', loss_err / u, 'u; update relative error',
        update_err / u, 'u')
  assert 2.0 ** -16 < update_err < 8 * u, update_err
  assert loss_err < u, (l16, l32)


# ------------------------------------------------------------------------------------------
# The digits classifier (the feature network of the digits metrics).
# ------------------------------------------------------------------------------------------


def _mlp_logits(params, images: np.ndarray) -> np.ndarray:
  """The classifier's forward pass in float64 NumPy, written out: 64 → 256 → 128 → 10."""
  h = images.reshape(len(images), -1).astype(np.float64) / 255.0
  for name in ('dense_0', 'dense_1'):
    h = np.maximum(h @ np.asarray(params[name]['kernel'], np.float64)
                   + np.asarray(params[name]['bias'], np.float64), 0.0)
  return h @ np.asarray(params['logits']['kernel'], np.float64) + np.asarray(
      params['logits']['bias'], np.float64)


@pytest.mark.slow
def test_digits_classifier_is_accurate_on_the_heldout_digits():
  """The classifier fitted on the 1,500 training digits classifies at least 95% of the 297
  held-out ones, measured here with a NumPy forward pass (not the cached figure)."""
  images, labels = helpers.digits('train')
  params = jax.device_get(digits_classifier.train(images, labels, seed=0))
  test_images, test_labels = helpers.digits('test')
  accuracy = np.mean(np.argmax(_mlp_logits(params, test_images), axis=1) == test_labels)
  print('held-out accuracy', accuracy)
  assert accuracy >= 0.95, accuracy
