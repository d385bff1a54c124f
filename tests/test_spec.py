"""The experiment spec: built once from a config, JSON round trip, and which differences a
resume may carry; the workdir files that hold it."""

import dataclasses
import json

import numpy as np
import pytest

from configs import cifar10, digits, tiny
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax import spec as spec_lib
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.data import input_pipeline
from diffusion_jax.models.unet import UNetConfig

import oracles  # tests/ is on sys.path under pytest's rootdir conftest

DIGITS = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500, 'test': 297})
CIFAR = input_pipeline.ImageDatasetInfo('cifar10', (32, 32, 3), 10, {'train': 50000})


def test_cifar10_config_is_the_papers_model_and_objective():
  spec = spec_lib.ExperimentSpec.from_config(cifar10.get_config(), CIFAR)
  assert spec.model == UNetConfig()  # the paper's CIFAR-10 U-Net: out_ch 3, unconditional
  assert spec.parameterization == gd.Parameterization('eps', 'fixedlarge')
  assert spec.diffusion.loss_type is gd.LossType.MSE
  assert spec.diffusion.timestep_sampling is spec_lib.TimestepSampling.UNIFORM
  np.testing.assert_allclose(spec.diffusion.betas()[[0, -1]], [1e-4, 0.02])
  assert spec.diffusion.make().num_timesteps == 1000
  assert (spec.training.batch_size, spec.training.ema_decay) == (128, 0.9999)


def test_model_fields_follow_the_data_and_the_variance():
  config = digits.get_config()
  config.diffusion.var_type = 'learned_range'
  config.model.class_conditional = True
  config.training.compute_dtype = 'bfloat16'
  spec = spec_lib.ExperimentSpec.from_config(config, DIGITS)
  assert (spec.model.out_ch, spec.model.num_classes) == (2, 10)
  assert spec.model.dtype == np.dtype('bfloat16') and spec.num_classes == 10
  config.model.out_ch = 4
  with pytest.raises(ValueError, match='model.out_ch is derived'):
    spec_lib.ExperimentSpec.from_config(config, DIGITS)


def test_fourier_time_scale_is_the_number_of_timesteps():
  config = tiny.get_config()  # T = 100
  config.model.time_embedding = 'fourier'
  spec = spec_lib.ExperimentSpec.from_config(config, DIGITS)
  assert (spec.model.time_embedding, spec.model.time_scale) == ('fourier', 100.0)
  config.model.time_scale = 1.0
  with pytest.raises(ValueError, match='model.time_scale is derived'):
    spec_lib.ExperimentSpec.from_config(config, DIGITS)


def test_ema_warmup_and_time_budget_are_resumable_and_checked():
  old = spec_lib.ExperimentSpec.from_config(tiny.get_config(), DIGITS)
  changed = tiny.get_config()
  assert changed.training.ema_warmup  # on in the digits recipe, which tiny extends
  changed.training.ema_warmup = False
  changed.training.time_budget_s = 60.0
  fixed, resumable = spec_lib.differences(old, spec_lib.ExperimentSpec.from_config(changed,
                                                                                   DIGITS))
  assert fixed == []
  assert resumable == [('run.time_budget_s', 0.0, 60.0), ('training.ema_warmup', True, False)]
  changed.training.time_budget_s = -1.0
  with pytest.raises(ValueError, match=r'training.time_budget_s .* got -1.0'):
    spec_lib.ExperimentSpec.from_config(changed, DIGITS)


def test_class_conditional_needs_labels():
  config = tiny.get_config()
  config.model.class_conditional = True
  unlabelled = input_pipeline.ImageDatasetInfo('faces', (8, 8, 1), 0, {'train': 10})
  with pytest.raises(ValueError, match="dataset 'faces' has no labels"):
    spec_lib.ExperimentSpec.from_config(config, unlabelled)


def test_json_round_trip_is_exact_and_hashable():
  spec = spec_lib.ExperimentSpec.from_config(digits.get_config(), DIGITS)
  text = json.dumps(spec.to_json())
  back = spec_lib.ExperimentSpec.from_json(json.loads(text))
  assert back == spec and hash(back) == hash(spec)
  with pytest.raises(ValueError, match='not an experiment spec'):
    spec_lib.ExperimentSpec.from_json({'seed': 0})


def test_differences_split_into_fixed_and_resumable():
  base = tiny.get_config()
  old = spec_lib.ExperimentSpec.from_config(base, DIGITS)
  changed = tiny.get_config()
  changed.model.ch = 64
  changed.diffusion.mean_type = 'v'
  changed.training.num_train_steps = 10
  changed.optimizer.learning_rate = 1e-4
  changed.data.data_dir = '/elsewhere'
  new = spec_lib.ExperimentSpec.from_config(changed, DIGITS)
  fixed, resumable = spec_lib.differences(old, new)
  assert fixed == [('diffusion.parameterization.mean_type', 'eps', 'v'), ('model.ch', 32, 64)]
  assert resumable == [('data.data_dir', None, '/elsewhere'),
                       ('optimizer.learning_rate', 1e-3, 1e-4),
                       ('run.num_train_steps', 4, 10)]
  assert spec_lib.describe_differences(fixed) == (
      "diffusion.parameterization.mean_type 'eps' -> 'v', model.ch 32 -> 64")


def test_default_model_fields_are_unetconfigs_less_the_derived_ones():
  fields = spec_lib.default_model_fields()
  want = {k: v for k, v in UNetConfig().to_dict().items()
          if k not in spec_lib.DERIVED_MODEL_FIELDS}
  assert set(fields) == set(want)
  for k, v in want.items():
    got = fields[k]
    if v is None:
      assert got.get() is None  # a typed placeholder, settable from a flag
    else:
      assert (list(got) if isinstance(got, tuple) else got) == v, k


def test_workdir_check_and_record(tmp_path):
  wd = tmp_path / 'run'
  config = tiny.get_config()
  spec = spec_lib.ExperimentSpec.from_config(config, DIGITS)
  assert workdir_lib.check_resume(wd, spec) is None
  workdir_lib.record_start(wd, spec, config, None, 0)
  assert workdir_lib.read_spec(wd) == spec
  assert json.loads((wd / 'config.json').read_text())['model']['ch'] == 32
  assert workdir_lib.check_resume(wd, spec) == []
  config.diffusion.schedule = 'cosine'
  with pytest.raises(workdir_lib.SpecMismatchError, match="diffusion.schedule 'linear' -> "
                     "'cosine'.*nothing in the workdir was changed"):
    workdir_lib.check_resume(wd, spec_lib.ExperimentSpec.from_config(config, DIGITS))
  with pytest.raises(workdir_lib.SpecMismatchError, match="data.dataset 'digits' -> 'mnist'"):
    workdir_lib.check_dataset(wd, 'mnist')
  assert sorted(p.name for p in wd.iterdir()) == ['config.json', 'spec.json']
  with pytest.raises(FileNotFoundError, match='spec.json not found'):
    workdir_lib.read_spec(tmp_path / 'nothing')


def test_data_pipeline_is_parsed_resumable_and_grain_for_older_specs():
  spec = spec_lib.ExperimentSpec.from_config(tiny.get_config(), DIGITS)
  assert spec.data.pipeline is input_pipeline.DataPipeline.MEMORY  # the digits recipe's
  old = spec.to_json()
  del old['data']['pipeline']  # a spec.json written before the field existed
  assert (spec_lib.ExperimentSpec.from_json(old).data.pipeline
          is input_pipeline.DataPipeline.GRAIN)
  fixed, resumable = spec_lib.differences(old, spec)
  assert fixed == [] and resumable == [('data.pipeline', '<absent>', 'memory')]
  assert spec_lib.ExperimentSpec.from_config(cifar10.get_config(), CIFAR).data.pipeline.value \
      == 'grain'
  bad = tiny.get_config()
  bad.data.pipeline = 'fast'
  with pytest.raises(ValueError, match=r"unknown data.pipeline 'fast'; allowed: 'grain', "
                                       r"'memory'"):
    spec_lib.ExperimentSpec.from_config(bad, DIGITS)


def test_steps_per_call_is_resumable_one_for_older_specs_and_divides_every_cadence():
  spec = spec_lib.ExperimentSpec.from_config(tiny.get_config(), DIGITS)
  assert spec.run.steps_per_call == 1
  old = spec.to_json()
  del old['run']['steps_per_call']  # a spec.json written before the field existed
  assert spec_lib.ExperimentSpec.from_json(old).run.steps_per_call == 1
  def config_with(every: int, eval_every: int, changes=()):
    """The tiny config at steps_per_call 2, 10 steps, its cadences `every`, then `changes`."""
    config = tiny.get_config()
    config.training.steps_per_call = 2
    config.training.num_train_steps = 10
    for n in ('log_every_steps', 'checkpoint_every_steps', 'sample_every_steps'):
      config.training[n] = every
    config.eval.every_steps = eval_every
    for section, n, v in changes:
      config[section][n] = v
    return config

  fixed, resumable = spec_lib.differences(
      spec, spec_lib.ExperimentSpec.from_config(config_with(4, 6), DIGITS))
  assert fixed == [] and ('run.steps_per_call', 1, 2) in resumable, (fixed, resumable)
  for section, name, value in (('training', 'num_train_steps', 9),
                               ('training', 'log_every_steps', 3),
                               ('training', 'checkpoint_every_steps', 5),
                               ('training', 'sample_every_steps', 7),
                               ('eval', 'every_steps', 1)):
    with pytest.raises(ValueError) as info:
      spec_lib.ExperimentSpec.from_config(config_with(2, 0, [(section, name, value)]), DIGITS)
    oracles.assert_one_line_error(str(info.value), f'{section}.{name}={value}',
                                  'multiple of training.steps_per_call=2')
  for value in (0, -1):
    bad = tiny.get_config()
    bad.training.steps_per_call = value
    with pytest.raises(ValueError, match=r'training.steps_per_call must be a positive integer, '
                                         rf'got {value}'):
      spec_lib.ExperimentSpec.from_config(bad, DIGITS)
  for value in (1.5, True):
    with pytest.raises(ValueError, match=r'training.steps_per_call must be a positive integer'):
      dataclasses.replace(spec.run, steps_per_call=value)
