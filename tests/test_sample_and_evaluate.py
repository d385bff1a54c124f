"""sample.py and `python evaluate.py` on tiny checkpointed workdirs.

The workdirs hold a checkpoint of the tiny config's training state in the trainer's format
(the spec's shapes, `checkpointing.save`, `spec.json` and `config.json`) with random NumPy
parameters: writing one costs a second where a training step's compile costs a
minute on a busy 2-core machine. The CLIs run in child processes with eight fake devices and a
shared persistent compilation cache; argument checks run in-process (they fail before
anything is compiled).
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import helpers  # tests/ is on sys.path under pytest's rootdir conftest
import oracles
import workdirs

from configs import tiny
from diffusion_jax.evaluation import evaluate
from diffusion_jax.evaluation import features
from diffusion_jax import trained_model
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.sampling.config import SamplerConfig
from diffusion_jax.spec import ExperimentSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 16


def _tiny_spec(data_dir, class_conditional=False):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.model.class_conditional = class_conditional
  info = input_pipeline.dataset_info(config.data.dataset, data_dir)
  return config, ExperimentSpec.from_config(config, info)


def _make_workdir(workdir, data_dir, class_conditional):
  config, _ = _tiny_spec(data_dir, class_conditional)
  info = input_pipeline.dataset_info(config.data.dataset, data_dir)
  return workdirs.write_workdir(workdir, config, info, seed=int(class_conditional))


@pytest.fixture(scope='module')
def env(child_env):
  base, data_dir = child_env['base'], child_env['data_dir']
  return dict(child_env, uncond=_make_workdir(str(base / 'uncond'), data_dir, False),
              cond=_make_workdir(str(base / 'cond'), data_dir, True))


def _sample(env, workdir, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--workdir={workdir}',
                         *args], env=env['env'], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


_ok = helpers.assert_ok                  # exit 0
_fails = helpers.assert_one_error_line   # exit 1 with one `error: ` line holding the fragments


# ------------------------------------------------------------------------------------------
# sample.py
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_writes_npz_grid_progressive_and_interpolation(env):
  _ok(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=ddpm', '--steps=5',
              '--progressive', '--interpolate'))
  out = os.path.join(env['uncond'], 'samples_ddpm_5')
  with np.load(os.path.join(out, 'samples.npz')) as f:
    assert f.files == ['images']  # unconditional: no labels
    images = f['images']
  assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 1)
  assert len(np.unique(images)) > 10  # not a constant image
  for name in ('grid.png', 'progressive.png', 'interpolation.png'):
    with Image.open(os.path.join(out, name)) as im:
      assert im.size[0] > 32 and im.size[1] > 8
  # A second run does not overwrite the first.
  before = os.path.getmtime(os.path.join(out, 'samples.npz'))
  _fails(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=ddpm', '--steps=5'),
         'already holds', '--overwrite')
  assert os.path.getmtime(os.path.join(out, 'samples.npz')) == before


@pytest.mark.slow
def test_progressive_and_interpolation_with_a_solver(env, tmp_path):
  # Not only the ancestral chain: any fixed-step sampler records its levels, and a
  # deterministic one encodes by running its solve upwards.
  out = str(tmp_path / 'heun')
  _ok(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=heun', '--steps=3',
              '--progressive', '--interpolate', f'--output={out}'))
  for name in ('grid.png', 'progressive.png', 'interpolation.png'):
    with Image.open(os.path.join(out, name)) as im:
      assert im.size[0] > 32 and im.size[1] > 8
  _fails(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=pc', '--interpolate',
                 f'--output={tmp_path}/pc'), '--interpolate', "'pc'")
  _fails(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=ode', '--progressive',
                 f'--output={tmp_path}/ode'), '--progressive', "'ode'")


@pytest.mark.slow
def test_ddim_eta0_is_deterministic_given_the_seed(env, tmp_path):
  def run(seed, name):
    out = str(tmp_path / name)
    _ok(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=ddim', '--steps=5',
                f'--seed={seed}', f'--output={out}'))
    with np.load(os.path.join(out, 'samples.npz')) as f:
      return f['images']
  a, b, c = run(0, 'a'), run(0, 'b'), run(1, 'c')
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.5


@pytest.mark.slow
def test_class_conditional_sampling_returns_the_requested_label(env, tmp_path):
  out = str(tmp_path / 'three')
  _ok(_sample(env, env['cond'], f'--num_samples={N}', '--sampler=ddim', '--steps=5',
              '--label=3', '--guidance_scale=1.5', f'--output={out}'))
  with np.load(os.path.join(out, 'samples.npz')) as f:
    assert f['images'].shape == (N, 8, 8, 1) and f['images'].dtype == np.uint8
    np.testing.assert_array_equal(f['labels'], np.full(N, 3))


@pytest.mark.slow
def test_sample_cli_bad_input_is_one_error_line(env, tmp_path):
  _fails(_sample(env, env['uncond'], '--num_samples=4', '--label=3',
                 f'--output={tmp_path}/x'), '--label', 'unconditional')
  _fails(_sample(env, str(tmp_path / 'nowhere'), '--num_samples=4'), 'spec.json')
  _fails(_sample(env, env['uncond'], '--num_samples=4', '--sampler=magic'),
         "unknown sampler 'magic'")
  assert not os.path.exists(tmp_path / 'x')


def test_sample_to_dir_checks_every_argument_before_restoring(env, tmp_path):
  uncond, cond = env['uncond'], env['cond']
  empty = str(tmp_path / 'empty')
  config, spec = _tiny_spec(env['data_dir'])
  workdir_lib.record_start(empty, spec, config, None, 0)
  cases = [  # (sample_to_dir arguments, SamplerConfig arguments, error, fragment)
      (dict(workdir=empty), {}, FileNotFoundError, 'no checkpoint'),
      (dict(num_samples=0), {}, ValueError, '--num_samples'),
      ({}, dict(kind='magic'), ValueError, "unknown sampler 'magic'; allowed: ddpm, ddim"),
      ({}, dict(steps=101), ValueError, '--steps must be in [1, 100]'),
      ({}, dict(steps=0), ValueError, 'positive integer'),
      (dict(batch_size=12), {}, ValueError, 'multiple of the 8 devices'),
      (dict(label=3), {}, ValueError, 'unconditional'),
      ({}, dict(guidance_scale=2.0), ValueError, 'class-conditional'),
      (dict(workdir=cond, label=10), {}, ValueError, '--label must be in [0, 10)'),
      (dict(workdir=cond, label=-1), {}, ValueError, '--label must be in [0, 10)'),
      (dict(progressive_chain=True), dict(kind='ode'), ValueError,
       "--progressive shows the levels of a fixed-step sampler, not 'ode'"),
      (dict(interpolation=True), dict(kind='sde'), ValueError,
       "--interpolate encodes through a deterministic solve"),
      ({}, dict(eta=0.5), ValueError, "eta applies to the ddim sampler only, not 'ddpm'"),
      (dict(num_samples=1, interpolation=True), {}, ValueError, '--num_samples >= 2'),
  ]
  for overrides, sampler, error, fragment in cases:
    kwargs = dict(workdir=uncond, num_samples=4, output=str(tmp_path / 'out'))
    kwargs.update(overrides)
    with pytest.raises(error) as e:
      kwargs['sampler'] = SamplerConfig(**sampler)
      trained_model.sample_to_dir(kwargs.pop('workdir'), **kwargs)
    oracles.assert_one_line_error(e.value, fragment)
  assert not os.path.exists(tmp_path / 'out')


# ------------------------------------------------------------------------------------------
# One sampler definition: the flags of both CLIs, the config's fields, the recommended default.
# ------------------------------------------------------------------------------------------


def _flags_sampler(recommended, *argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from diffusion_jax.sampling import flags as sampler_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  sampler_flags.define_flags(fv)
  fv(['prog', *argv])
  return sampler_flags.from_flags(recommended, fv)


RECOMMENDED = SamplerConfig('dpmpp_2m', steps=20)


@pytest.mark.parametrize('argv,want', [
    ((), RECOMMENDED),
    (('--steps=7',), SamplerConfig('dpmpp_2m', steps=7)),
    (('--step_schedule=karras',), SamplerConfig('dpmpp_2m', steps=20, step_schedule='karras')),
    (('--sampler=dpmpp_2m', '--guidance_scale=2'),
     SamplerConfig('dpmpp_2m', steps=20, guidance_scale=2.0)),
    (('--sampler=heun', '--steps=10', '--churn=5'), SamplerConfig('heun', steps=10, churn=5.0)),
    (('--sampler=pc', '--snr=0.3'), SamplerConfig('pc', snr=0.3)),
    (('--sampler=ode', '--rtol=1e-4'), SamplerConfig('ode', rtol=1e-4)),
    (('--sampler=ddim', '--steps=50', '--eta=0.5'), SamplerConfig('ddim', steps=50, eta=0.5)),
    (('--sampler=ddpm',), SamplerConfig('ddpm')),   # another kind: all T, not the 20 steps
])
def test_sampler_flags_set_every_option_over_the_recommended_sampler(argv, want):
  got, source = _flags_sampler(RECOMMENDED, *argv)
  assert got == want, (argv, got)
  assert source == ("the workdir's recommended sampler" if not argv else 'from the flags')


def test_sampler_flags_reject_options_of_another_sampler_in_one_line():
  with pytest.raises(ValueError) as e:
    _flags_sampler(RECOMMENDED, '--churn=5')
  oracles.assert_one_line_error(e.value, "churn applies to the heun sampler only, not 'dpmpp_2m'")
  with pytest.raises(ValueError) as e:
    _flags_sampler(RECOMMENDED, '--sampler=ddpm', '--eta=0.5')
  oracles.assert_one_line_error(e.value, "eta applies to the ddim sampler only, not 'ddpm'")


def test_config_sampler_fields_are_the_flags_and_the_recipe_recommends_dpmpp_2m():
  from diffusion_jax.sampling import config as sampler_config
  config, spec = _tiny_spec(None)
  assert spec.eval.sampler == RECOMMENDED          # the digits recipe's, inherited by tiny
  for group in (config.training, config.eval):
    assert {k for k in sampler_config.OPTIONS if k != 'steps'} <= set(group)
  config.eval.sampler, config.eval.sample_steps, config.eval.churn = 'heun', 10, 5.0
  config.training.sampler, config.training.snr = 'pc', 0.3
  info = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500})
  spec = ExperimentSpec.from_config(config, info)
  assert spec.eval.sampler == SamplerConfig('heun', steps=10, churn=5.0)
  assert spec.run.sampler == SamplerConfig('pc', steps=100, snr=0.3)
  assert ExperimentSpec.from_json(spec.to_json()) == spec


@pytest.mark.slow
def test_both_clis_default_to_the_recommended_sampler_and_take_every_flag(env, tmp_path):
  out = str(tmp_path / 'default')
  result = _ok(_sample(env, env['uncond'], f'--num_samples={N}', f'--output={out}'))
  assert ("sampler: dpmpp_2m, 20 steps (logsnr) (the workdir's recommended sampler)"
          in result.stdout), result.stdout
  assert os.path.exists(os.path.join(out, 'samples.npz'))
  result = _ok(_sample(env, env['cond'], f'--num_samples={N}', '--sampler=pc', '--steps=3',
                       '--snr=0.3', '--guidance_scale=1.5', f'--output={tmp_path / "pc"}'))
  assert 'sampler: pc, 3 steps, snr 0.3, guidance 1.5 (logsnr) (from the flags)' in result.stdout
  result = _ok(_evaluate(env, env['uncond'], f'--num_samples={N}', '--bpd_examples=0',
                         '--sampler=heun', '--steps=2', '--churn=5',
                         '--step_schedule=time_uniform'))
  assert 'sampler: heun, 2 steps, churn 5 (time_uniform) (from the flags)' in result.stderr
  with open(os.path.join(env['uncond'], 'eval.json')) as f:
    assert json.load(f)['fid_sampler'] == SamplerConfig(
        'heun', steps=2, churn=5.0, step_schedule='time_uniform').to_dict()
  result = _ok(_evaluate(env, env['cond'], f'--num_samples={N}', '--bpd_examples=0',
                         '--sampler=ddim', '--steps=3', '--eta=0.5', '--guidance_scale=1'))
  with open(os.path.join(env['cond'], 'eval.json')) as f:
    assert json.load(f)['fid_sampler'] == SamplerConfig(
        'ddim', steps=3, eta=0.5, guidance_scale=1.0).to_dict()


def test_slerp_ends_and_norm():
  a = jax.numpy.array([[1.0, 0.0]])
  b = jax.numpy.array([[0.0, 1.0]])
  z = trained_model.slerp(a, b, jax.numpy.linspace(0.0, 1.0, 5))
  assert z.shape == (5, 1, 2)
  np.testing.assert_allclose(z[0], a, atol=1e-6)
  np.testing.assert_allclose(z[-1], b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z).reshape(5, 2), axis=1), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(trained_model.slerp(a, a, jax.numpy.array([0.3]))[0], a)


# ------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------


def _evaluate(env, workdir, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'),
                         f'--workdir={workdir}', *args], env=env['env'], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_evaluate_cli_writes_eval_json(env):
  # 12 examples in batches of 16: 4 padded slots must not count.
  _ok(_evaluate(env, env['uncond'], f'--num_samples={N}', '--bpd_examples=12', '--sampler=ddim',
                '--steps=5'))
  with open(os.path.join(env['uncond'], 'eval.json')) as f:
    results = json.load(f)
  assert results['step'] == 2 and results['bpd_num_examples'] == 12
  for k in ('bpd', 'bpd_prior', 'fid', 'inception_score', 'precision', 'recall'):
    assert np.isfinite(results[k]), k
  assert results['bpd'] > results['bpd_prior'] > 0 and results['fid'] > 0
  assert 1.0 <= results['inception_score'] <= 10.0
  assert results['fid_num_samples'] == N and results['fid_sampler']['kind'] == 'ddim'
  # The digits classifier and the reference statistics are cached in the data_dir.
  cached = os.listdir(features.cache_dir(env['data_dir']))
  assert any(n.startswith('digits_classifier_') for n in cached)
  assert any(n.startswith('reference_digits_classifier_') and n.endswith('_digits_train.npz')
             for n in cached)
  classifier = next(n for n in cached if n.startswith('digits_classifier_'))
  with np.load(os.path.join(features.cache_dir(env['data_dir']), classifier)) as f:
    assert f['test_accuracy'] > 0.95


@pytest.mark.slow
def test_evaluate_cli_bad_input(env):
  _fails(_evaluate(env, env['uncond'], '--features=inception'), '--inception_weights')
  _fails(_evaluate(env, env['uncond'], '--features=fancy'), "allowed: 'digits', 'inception'")
  with pytest.raises(ValueError, match='--bpd_examples must be at most 297'):
    evaluate.evaluate(env['uncond'], num_samples=0, bpd_examples=1000)
  with pytest.raises(ValueError, match='at least 4'):
    evaluate.evaluate(env['uncond'], num_samples=2)


@pytest.mark.slow
def test_periodic_eval_during_training(env):
  # What train.py calls every spec.eval.every_steps steps, on the tiny model.
  import dataclasses  # pylint: disable=g-import-not-at-top
  trained = trained_model.load_ema_params(env['uncond'])
  spec = trained.spec
  spec = dataclasses.replace(spec, eval=dataclasses.replace(
      spec.eval, num_samples=8, bpd_examples=8, sampler=SamplerConfig('ddim', steps=2)))
  fn = evaluate.make_periodic_eval(spec, model=trained.model, diffusion=trained.diffusion,
                                   mesh=trained.mesh)
  metrics = fn(trained.ema_params, 2)
  assert set(metrics) == {'eval/bpd', 'eval/fid', 'eval/inception_score',
                          'eval/inception_score_std', 'eval/precision', 'eval/recall'}
  assert all(np.isfinite(v) for v in metrics.values())


# ------------------------------------------------------------------------------------------
# A workdir stands alone.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_copied_workdir_samples_without_its_dataset_bit_identically(env, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'own_tfds')
  digits.prepare_digits(data_dir)
  original = _make_workdir(str(tmp_path / 'original'), data_dir, False)
  args = (f'--num_samples={N}', '--sampler=ddim', '--steps=5', '--seed=3')
  _ok(_sample(env, original, *args, f'--output={tmp_path / "a"}'))
  moved = str(tmp_path / 'moved' / 'run')
  shutil.copytree(original, moved)
  shutil.rmtree(original)
  shutil.rmtree(data_dir)
  _ok(_sample(env, moved, *args, f'--output={tmp_path / "b"}'))
  assert not os.path.exists(data_dir), 'sampling touched the dataset'
  with np.load(tmp_path / 'a' / 'samples.npz') as a, np.load(tmp_path / 'b' / 'samples.npz') as b:
    np.testing.assert_array_equal(a['images'], b['images'])
  # Sample metrics need only the features' reference (digits are rebuilt from scikit-learn).
  _ok(_evaluate(env, moved, f'--num_samples={N}', '--bpd_examples=0', '--steps=5'))
  with open(os.path.join(moved, 'eval.json')) as f:
    assert np.isfinite(json.load(f)['fid'])


def test_evaluation_says_when_the_data_it_needs_is_missing(env, tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  _, spec = _tiny_spec(env['data_dir'])
  spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, dataset='cifar10'))
  with pytest.raises(FileNotFoundError) as e:
    evaluate.data_info(spec, str(tmp_path / 'no_data'))
  oracles.assert_one_line_error(e.value, "dataset 'cifar10'", 'no_data', '--data_dir')


@pytest.mark.slow
def test_evaluate_reports_the_ode_likelihood_beside_the_bound(env):
  results = evaluate.evaluate(env['uncond'], num_samples=0, bpd_examples=8, likelihood='ode',
                              progress=False)
  assert results['bpd_num_examples'] == results['bpd_ode_num_examples'] == 8
  assert np.isfinite(results['bpd']) and np.isfinite(results['bpd_ode'])
  assert results['bpd_ode_stderr'] > 0 and results['bpd_ode_mean_evaluations'] > 10
  # Dequantized bits/dim of 8-bit data lie in (0, 8 + the prior's slack): neither the
  # negative values of an undequantized density nor the ~31 of an integration run backwards.
  assert 0 < results['bpd_ode'] < 20, results['bpd_ode']
  with pytest.raises(ValueError, match="unknown likelihood 'exact'; allowed: vlb, ode"):
    evaluate.evaluate(env['uncond'], num_samples=0, bpd_examples=8, likelihood='exact')


# ------------------------------------------------------------------------------------------
# Quiet checkpoint reads.
# ------------------------------------------------------------------------------------------

ORBAX_WARNING = re.compile(r'Metadata file does not exist|read.only|orbax|checkpoint(_manager)?'
                           r'\.py:\d+\]', re.IGNORECASE)


@pytest.mark.slow
def test_train_then_sample_prints_no_orbax_warnings(env, tmp_path):
  """A fresh workdir of the tiny config, trained 2 steps, then sampled: no orbax warning in
  either output (they read as failures to a new user; damaged checkpoints keep their one
  warning line, tests/test_reliability.py)."""
  workdir = str(tmp_path / 'fresh')
  trained = subprocess.run(workdirs.train_cmd(env['data_dir'], workdir,
                                              '--config.training.num_train_steps=2'),
                           env=env['env'], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert trained.returncode == 0, trained.stderr[-3000:]
  sampled = _ok(_sample(env, workdir, f'--num_samples={N}', '--steps=2'))
  for name, result in (('train.py', trained), ('sample.py', sampled)):
    noisy = [l for l in (result.stdout + result.stderr).splitlines() if ORBAX_WARNING.search(l)]
    assert not noisy, (name, noisy)


# ------------------------------------------------------------------------------------------
# A variance-exploding (NCSN-style) workdir through both CLIs.
# ------------------------------------------------------------------------------------------


def test_a_ve_workdir_samples_with_ald_sde_pc_ode_and_ddpm_and_has_an_ode_likelihood(env,
                                                                                     tmp_path):
  config = tiny.get_config()
  config.data.data_dir = env['data_dir']
  d = config.diffusion
  d.process, d.objective, d.sigma_min, d.sigma_max = 've', 'dsm', 0.01, 10.0
  config.model.time_embedding = 'fourier'
  config.training.sampler = config.eval.sampler = 'pc'
  config.training.sample_steps = config.eval.sample_steps = 3
  info = input_pipeline.dataset_info(config.data.dataset, env['data_dir'])
  ve = workdirs.write_workdir(str(tmp_path / 've'), config, info)
  for flags, line in ((['--sampler=ald', '--steps=2', '--langevin_steps=2'],
                       'sampler: ald, 2 steps, 2 per level, step 2e-05 (logsnr)'),
                      (['--sampler=sde', '--steps=3'], 'sampler: sde, 3 steps'),
                      ([], "sampler: pc, 3 steps, snr 0.16 (logsnr) (the workdir's recommended"),
                      (['--sampler=ode', '--rtol=0.05'], 'sampler: ode (rtol 0.05)'),
                      # ddpm on ve: score_sde's ancestral sampler, on logsnr levels (no T)
                      (['--sampler=ddpm', '--steps=3'],
                       'sampler: ddpm, 3 steps (from the flags)')):
    out = str(tmp_path / ('out_' + (flags[0][10:] if flags else 'default')))
    result = _ok(_sample(env, ve, f'--num_samples={N}', f'--output={out}', *flags))
    assert line in result.stdout, result.stdout
    with np.load(os.path.join(out, 'samples.npz')) as f:
      assert f['images'].shape == (N, 8, 8, 1) and f['images'].dtype == np.uint8
  # DDPM's integer timesteps: the 'vp' process only.
  _fails(_sample(env, ve, f'--num_samples={N}', '--sampler=ddim', '--step_schedule=respaced'),
         "'respaced'", "'ve'")
  _ok(_evaluate(env, ve, '--num_samples=0', '--bpd_examples=4', '--likelihood=ode'))
  with open(os.path.join(ve, 'eval.json')) as f:
    results = json.load(f)
  assert np.isfinite(results['bpd_ode']) and results['bpd_ode_num_examples'] == 4
  assert 'bpd' not in results      # DDPM's discrete bound: the 'vp' process only
  _fails(_evaluate(env, ve, '--num_samples=0', '--bpd_examples=4'), '--likelihood vlb',
         "'ve'", '--likelihood ode')
  # ald on a DDPM (vp) workdir.
  _fails(_sample(env, env['uncond'], f'--num_samples={N}', '--sampler=ald'), "'ald'", "'vp'")
