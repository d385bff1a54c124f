"""The training step and the trainer, on eight fake CPU devices.

Step-level tests call `train_step` directly on a tiny U-Net; trainer-level tests run
`train.py` in child processes (a real SIGKILL for the resume test, two processes on loopback
for the multi-host test) that share a persistent compilation cache.
"""

import functools
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import schedules
from diffusion_jax.training import step as step_lib
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.spec import OptimizerConfig
from diffusion_jax.training.state import TrainState

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles
import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 50
BATCH = 16
IMAGE = (8, 8, 1)


# ------------------------------------------------------------------------------------------
# The step.
# ------------------------------------------------------------------------------------------


def _setup(mean_type='eps', var_type='fixedlarge', loss_type='mse', *, importance=False,
           accum=1, ema_decay=0.9, ema_warmup=False, num_classes=None, sgd=False):
  """A tiny U-Net's state and bound step; `sgd` swaps Adam for SGD(1): params move by −grad.

  The equivalence tests use SGD: Adam's first step is g/(|g| + ε), which turns the float
  noise of gradients that are zero in exact arithmetic (a bias before a per-channel
  GroupNorm, attention's key bias) into steps of up to ±lr.
  """
  var = gd.VarType.parse(var_type)
  model = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.0, out_ch=2 if var.is_learned else 1,
                     num_classes=num_classes).make()
  diffusion = gd.GaussianDiffusion.from_betas(schedules.get_beta_schedule('linear', T))
  cfg = step_lib.StepConfig(loss_type=loss_type,
                            parameterization=gd.Parameterization(mean_type, var_type),
                            importance_sampling=importance, ema_decay=ema_decay,
                            ema_warmup=ema_warmup, grad_accum_steps=accum, num_classes=num_classes,
                            label_dropout=0.2 if num_classes else 0.0)
  opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
  tx = optax.sgd(1.0) if sgd else opt.make()
  params = model.init({'params': jax.random.PRNGKey(1)}, jnp.zeros((1,) + IMAGE),
                      jnp.zeros((1,), jnp.int32),
                      y=jnp.zeros((1,), jnp.int32) if num_classes else None)['params']
  # Perturb the zero-initialised head so every parameter gets a gradient in step one.
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  from diffusion_jax.training import timestep_sampler  # pylint: disable=g-import-not-at-top
  history = timestep_sampler.LossHistory.create(T, 2) if importance else None
  state = TrainState.create(params, tx, jax.random.PRNGKey(3), history)
  step_fn = functools.partial(step_lib.train_step, model=model, diffusion=diffusion, tx=tx,
                              learning_rate_fn=opt.learning_rate_schedule(), cfg=cfg)
  return state, step_fn


def _batch(seed=None):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (BATCH,) + IMAGE).astype(np.float32) / 127.5 - 1.0
  return dict(image=jnp.asarray(image), label=jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32))


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _assert_trees_close(a, b, atol):
  """Leafwise |a − b| ≤ atol; atol of a few ulps where params are near 1 (GroupNorm scales)."""
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('mean_type,var_type,loss_type,importance,accum,classes', [
    ('eps', 'fixedlarge', 'mse', False, 1, None),
    ('xstart', 'fixedsmall', 'kl', False, 1, None),
    ('v', 'learned_range', 'hybrid', True, 2, None),
    ('xprev', 'learned', 'mse', False, 1, 10),
])
@pytest.mark.slow
def test_one_real_step_per_type(mean_type, var_type, loss_type, importance, accum, classes):
  state, step_fn = _setup(mean_type, var_type, loss_type, importance=importance, accum=accum,
                          num_classes=classes)
  before = _copy(state)
  update = step_lib.data_parallel_step(step_fn, helpers.mesh(8))
  new, metrics = update(state, _batch())
  assert int(new.step) == 1
  for k in ('loss', 'mse', 'vb', 'grad_norm', 'learning_rate'):
    assert np.isfinite(metrics[k]), (k, metrics[k])
  assert float(metrics['grad_norm']) > 0
  if loss_type == 'kl':
    assert float(metrics['vb']) >= 0 and float(metrics['mse']) == 0
  if var_type.startswith('learned') or loss_type == 'hybrid':
    assert float(metrics['vb']) > 0
  # Every parameter moved, and the EMA is decay·old + (1 − decay)·new.
  for (path, p0), p1, e1 in zip(jax.tree_util.tree_flatten_with_path(before.params)[0],
                                jax.tree.leaves(new.params), jax.tree.leaves(new.ema_params)):
    assert not np.array_equal(p0, p1), jax.tree_util.keystr(path)
    np.testing.assert_allclose(e1, 0.9 * p0 + 0.1 * np.asarray(p1), rtol=1e-6, atol=5e-7)
  if importance:  # all 16 examples of the global batch entered the history
    assert int(new.loss_history.counts.sum()) == BATCH


@pytest.mark.slow
def test_ema_warmup_is_tfs_num_updates_rule():
  cfg = step_lib.StepConfig(ema_decay=0.999, ema_warmup=True)
  n = np.arange(0, 20000, 7)
  got = np.asarray(jax.jit(lambda s: step_lib.ema_decay(cfg, s))(jnp.asarray(n, jnp.int32)))
  np.testing.assert_allclose(got, np.minimum(0.999, (1.0 + n) / (10.0 + n)), rtol=1e-6)
  assert step_lib.ema_decay(step_lib.StepConfig(ema_decay=0.999), jnp.int32(5)) == 0.999
  # Two real steps: the EMA is 0.1·p₀ + 0.9·p₁, then (2/11)·that + (9/11)·p₂.
  state, step_fn = _setup(ema_decay=0.999, ema_warmup=True)
  update = step_lib.data_parallel_step(step_fn, helpers.mesh(1))
  p0 = _copy(state.params)
  s1, _ = update(state, _batch(0))
  p1 = _copy(s1.params)  # the next update donates s1
  s2, _ = update(s1, _batch(1))
  for a, b, c, e in zip(jax.tree.leaves(p0), jax.tree.leaves(p1),
                        jax.tree.leaves(_copy(s2.params)), jax.tree.leaves(_copy(s2.ema_params))):
    first = 0.1 * a.astype(np.float64) + 0.9 * b
    np.testing.assert_allclose(e, 2 / 11 * first + 9 / 11 * c, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shard_map_and_pmap_agree():
  state, step_fn = _setup(sgd=True)
  batch = _batch()
  n = jax.device_count()
  stacked = jax_utils.replicate(jax.tree.map(np.asarray, state))
  new_pmap, m_pmap = step_lib.pmap_step(step_fn)(
      stacked, jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch))
  new_shard, m_shard = step_lib.data_parallel_step(step_fn, helpers.mesh(n))(state, batch)
  _assert_trees_close(jax_utils.unreplicate(new_pmap), new_shard, atol=5e-7)
  for k in ('loss', 'grad_norm'):
    np.testing.assert_allclose(m_pmap[k][0], m_shard[k], rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_eight_devices_match_one_on_the_same_global_batch():
  state, step_fn = _setup(sgd=True)
  batch = _batch()
  new8, m8 = step_lib.data_parallel_step(step_fn, helpers.mesh(8))(_copy(state), batch)
  new1, m1 = step_lib.data_parallel_step(step_fn, helpers.mesh(1))(_copy(state), batch)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-4)
  _assert_trees_close(new8.params, new1.params, atol=5e-7)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch():
  state, step_fn = _setup(sgd=True)
  _, step_fn2 = _setup(accum=2, sgd=True)
  batch = _batch()
  new1, m1 = step_lib.data_parallel_step(step_fn, helpers.mesh(4))(_copy(state), batch)
  new2, m2 = step_lib.data_parallel_step(step_fn2, helpers.mesh(4))(_copy(state), batch)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-4)
  _assert_trees_close(new1.params, new2.params, atol=5e-7)


@pytest.mark.parametrize('field,value,fragment', [
    ('diffusion.timestep_sampler', 'lottery', "'lottery'; allowed: 'uniform', 'importance'"),
    ('diffusion.mean_type', 'noise', "'noise'; allowed: 'eps'"),
    ('diffusion.var_type', 'big', "'big'; allowed: 'fixedsmall'"),
    ('diffusion.loss_type', 'l1', "'l1'; allowed: 'mse'"),
    ('diffusion.schedule', 'wavy', "'wavy'"),
    ('training.compute_dtype', 'float16', "'float16'; allowed: float32, bfloat16"),
    ('training.ema_decay', 1.0, 'ema_decay must be in [0, 1), got 1.0'),
    ('training.sampler', 'magic', "unknown sampler 'magic'"),
])
def test_spec_parses_every_string_once_and_rejects_bad_values(field, value, fragment):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.spec import ExperimentSpec  # pylint: disable=g-import-not-at-top
  info = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500})
  config = tiny.get_config()
  spec = ExperimentSpec.from_config(config, info)
  assert spec.parameterization == gd.Parameterization(gd.MeanType.EPS, gd.VarType.FIXED_LARGE)
  assert ExperimentSpec.from_json(spec.to_json()) == spec
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ValueError) as e:
    ExperimentSpec.from_config(config, info)
  oracles.assert_one_line_error(e.value, fragment)


# ------------------------------------------------------------------------------------------
# The trainer, in child processes.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def env(child_env):
  return child_env


def _train_cmd(env, workdir, *overrides):
  return workdirs.train_cmd(env['data_dir'], workdir, *overrides)


def _run(env, cmd, env_vars=None, **kwargs):
  return subprocess.run(cmd, env=env_vars or env['env'], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, **kwargs)


RESUME = ('--config.training.num_train_steps=8', '--config.training.checkpoint_every_steps=4',
          '--config.training.log_every_steps=1')


@pytest.fixture
def unbroken(trained_workdir):
  """A copy of the run's trained tiny workdir: 8 steps, checkpoints 2, 4, 6 and 8 (conftest)."""
  return trained_workdir


def test_resume_after_sigkill_is_bit_identical(env, unbroken):
  # The trainer kills itself once the save of step 8 is started: 4 is committed, 8 is not.
  workdir = str(env['base'] / 'killed')
  killed = _run(env, _train_cmd(env, workdir, *RESUME),
                env_vars=dict(env['env'], DIFFUSION_JAX_FAULT='save_started:8:kill'))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  ckpts = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert '4' in ckpts and '8' not in ckpts, ckpts

  result = _run(env, _train_cmd(env, workdir, *RESUME))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from checkpoint 4' in result.stderr

  workdirs.assert_same_checkpoint(unbroken, workdir, 8)


def test_two_processes_match_each_other_and_one_process(env):
  base = env['base']
  worker = os.path.join(ROOT, 'tests', 'multihost_worker.py')
  e2 = dict(env['env'], XLA_FLAGS=env['env']['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=2'))
  port = helpers.free_port()
  procs = [subprocess.Popen(
      [sys.executable, worker, str(base / f'mh_{i}.npz'), str(base / 'mh_workdir'),
       env['data_dir'], '2', str(i), str(port)], env=e2, cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  e4 = dict(env['env'], XLA_FLAGS=env['env']['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=4'))
  single = subprocess.run([sys.executable, worker, str(base / 'sp.npz'),
                           str(base / 'sp_workdir'), env['data_dir'], '1', '0', '0'],
                          env=e4, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  p0, p1, sp = (np.load(base / n) for n in ('mh_0.npz', 'mh_1.npz', 'sp.npz'))
  assert sorted(p0.files) == sorted(p1.files) == sorted(sp.files) and len(p0.files) > 10
  for k in p0.files:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    np.testing.assert_allclose(p0[k], sp[k], atol=2e-6, rtol=0, err_msg=k)
  # The checkpoint was written collectively, once.
  assert os.path.isdir(base / 'mh_workdir' / 'checkpoints' / '3' / 'state')


# ------------------------------------------------------------------------------------------
# Bad input: one clear line and a non-zero exit.
# ------------------------------------------------------------------------------------------


def _assert_fails(result, *fragments):
  assert result.returncode != 0
  last = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert last, result.stderr[-3000:]
  for f in fragments:
    assert f in last[-1], (f, last[-1])


def test_batch_not_divisible_by_devices(env, tmp_path):
  _assert_fails(_run(env, _train_cmd(env, tmp_path, '--config.training.batch_size=12')),
                'batch_size=12', '8 devices')


def test_unknown_dataset(env, tmp_path):
  _assert_fails(_run(env, _train_cmd(env, tmp_path, '--config.data.dataset=no_such_data')),
                "'no_such_data'")


def test_checkpoint_of_another_model_shape(env, unbroken):
  before = sorted(os.listdir(os.path.join(unbroken, 'checkpoints')))
  result = _run(env, _train_cmd(env, unbroken, *RESUME, '--config.model.ch=64'))
  _assert_fails(result, 'model.ch 32 -> 64', 'new --workdir')
  assert sorted(os.listdir(os.path.join(unbroken, 'checkpoints'))) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env, unbroken, tmp_path):
  workdir = str(tmp_path / 'nan')
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(unbroken, workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert before == ['2', '4', '6', '8']
  result = _run(env, _train_cmd(
      env, workdir, '--config.training.num_train_steps=20',
      '--config.training.checkpoint_every_steps=100', '--config.training.log_every_steps=1',
      '--config.optimizer.learning_rate=1e30', '--config.optimizer.warmup_steps=0'))
  _assert_fails(result, 'non-finite loss', 'at step', 'checkpoint (8)')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_checkpoint_of_another_optimizer(env, unbroken):
  result = _run(env, _train_cmd(env, unbroken, *RESUME, '--config.optimizer.grad_clip=0'))
  _assert_fails(result, 'checkpoint 8', 'does not fit', 'new --workdir')


# ------------------------------------------------------------------------------------------
# Restarts compare experiment specs.
# ------------------------------------------------------------------------------------------


def _snapshot(workdir):
  """Every file under `workdir` with its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.mark.parametrize('override,fragment', [
    ('--config.model.ch=64', 'model.ch 32 -> 64'),
    ('--config.diffusion.mean_type=v', "diffusion.parameterization.mean_type 'eps' -> 'v'"),
    ('--config.diffusion.schedule=cosine', "diffusion.schedule 'linear' -> 'cosine'"),
    ('--config.diffusion.num_timesteps=200', 'diffusion.num_timesteps 100 -> 200'),
    ('--config.diffusion.loss_type=hybrid', "diffusion.loss_type 'mse' -> 'hybrid'"),
    ('--config.data.dataset=mnist', "data.dataset 'digits' -> 'mnist'"),
    ('--config.training.batch_size=32', 'training.batch_size 16 -> 32'),
])
def test_restart_with_another_model_or_objective_is_refused(env, unbroken, override, fragment):
  before = _snapshot(unbroken)
  result = _run(env, _train_cmd(env, unbroken, *RESUME, override))
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert fragment in errors[0] and 'new --workdir' in errors[0], errors[0]
  assert _snapshot(unbroken) == before


def test_time_budget_stops_with_a_checkpoint(env, unbroken, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'budget')
  shutil.copytree(unbroken, workdir)
  # A millisecond from the start of train.py: always spent when step 9 (the first after the
  # resume from 8) ends, since imports alone take longer; the budget is checked after steps.
  result = _run(env, _train_cmd(env, workdir, '--config.training.num_train_steps=1000',
                                '--config.training.checkpoint_every_steps=1000',
                                '--config.training.log_every_steps=100',
                                '--config.training.time_budget_s=0.001'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Time budget of 0.001 s spent after step 9' in result.stderr, result.stderr[-3000:]
  # The copy held 2, 4, 6 and 8; the config's keep_checkpoints (3) leaves the newest three.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6', '8', '9']


def test_restart_with_resumable_changes_goes_on_and_records_them(env, unbroken, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'longer')
  shutil.copytree(unbroken, workdir)
  with open(os.path.join(workdir, 'spec.json')) as f:
    old = json.load(f)
  result = _run(env, _train_cmd(env, workdir, '--config.training.num_train_steps=9',
                                '--config.training.checkpoint_every_steps=9',
                                '--config.training.log_every_steps=1',
                                '--config.optimizer.learning_rate=5e-4'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from checkpoint 8' in result.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '9', 'ema'))
  with open(os.path.join(workdir, 'spec.json')) as f:
    new = json.load(f)
  assert new['run']['num_train_steps'] == 9 and new['optimizer']['learning_rate'] == 5e-4
  # The shared workdir was trained on the run's own copy of the digits: data_dir changes too.
  assert new['data'] == dict(old['data'], data_dir=env['data_dir'])
  assert {k: v for k, v in new.items() if k not in ('run', 'optimizer', 'data')} == {
      k: v for k, v in old.items() if k not in ('run', 'optimizer', 'data')}
  with open(os.path.join(workdir, 'spec_changes.jsonl')) as f:
    (line,) = [json.loads(l) for l in f]
  assert line['resumed_at_step'] == 8
  assert line['changes'] == {'run.num_train_steps': [8, 9],
                             'run.checkpoint_every_steps': [2, 9],
                             'run.keep_checkpoints': [4, 3],
                             'optimizer.learning_rate': [1e-3, 5e-4],
                             'data.data_dir': [old['data']['data_dir'], env['data_dir']]}
