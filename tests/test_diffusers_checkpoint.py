"""diffusers checkpoints in and out (diffusion_jax/tools/diffusers_checkpoint.py), proven
against diffusers itself (the `bench` extra: torch and diffusers, CPU).

Tolerance. Both sides run in float32 (JAX at `default_matmul_precision('highest')`, torch's
CPU default). The same function summed in another order differs by rounding: float32 has
ε = 1.2e-7 per operation, and a convolution of the U-Net sums up to 3·3·768 products, ~70
layers deep, so differences of ~1e-6 of the output's scale are expected (measured: 1-3e-6).
We require max |ours − theirs| ≤ 1e-5 · max |theirs| (`RTOL`): 3-10× that margin, while a
mis-mapped weight costs O(1) (the swapped-up-blocks test measures it).

Every diffusers model here has random non-default weights: every tensor, norms and biases
included, is perturbed (`_perturb`), so no parameter keeps a constant initial value that a
wrong mapping would leave unnoticed (a GroupNorm scale of 1 read as a bias of 1, say).

torch and diffusers are imported by the fixtures of those names, so only the tests that use
them are skipped where they are missing; the configuration checks run without them.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.storage import checkpointing
from diffusion_jax.process import continuous
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers
from diffusion_jax.sampling.config import SamplerConfig
from diffusion_jax import trained_model
from diffusion_jax.storage import workdir as workdir_lib
from diffusion_jax.tools import diffusers_checkpoint as dc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
SEED = 20


@pytest.fixture(name='torch', scope='session')
def torch_fixture():
  """torch, or the test is skipped (it comes with the `bench` extra)."""
  return pytest.importorskip('torch')


@pytest.fixture(name='diffusers', scope='session')
def diffusers_fixture(torch):
  """diffusers (and torch, which its models need), or the test is skipped."""
  del torch
  return pytest.importorskip('diffusers')


# The tests that only reach torch and diffusers through the helpers below.
needs_diffusers = pytest.mark.usefixtures('diffusers')


def _unet(**overrides):
  """A diffusers UNet2DModel with DDPM's fixed settings and `overrides`."""
  cfg = dict(sample_size=32, block_out_channels=(32, 64),
             down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
             up_block_types=('AttnUpBlock2D', 'UpBlock2D'), layers_per_block=1,
             attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1)
  cfg.update(overrides)
  import diffusers  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return diffusers.UNet2DModel(**cfg)


def _perturb(model, seed: int):
  """Adds noise to every tensor (10% of its spread; 0.1 for constant ones such as norm
  scales and zero biases), in place; returns the model in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      spread = float(p.std()) if p.numel() > 1 else 0.0
      p.add_(torch.randn(p.shape, generator=g) * (0.1 * spread if spread > 0 else 0.1))
  return model.eval()


def _inputs(seed: int, batch: int, shape, num_timesteps: int = 1000):
  rs = np.random.RandomState(seed)
  print(f'inputs: seed {seed}, batch {batch}, shape {tuple(shape)}')
  x = rs.randn(batch, *shape).astype(np.float32)  # [B, H, W, C]
  t = rs.randint(0, num_timesteps, size=batch).astype(np.int32)
  return x, t


def _theirs(model, x, t, y=None):
  import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                class_labels=None if y is None else torch.from_numpy(y).long()).sample
  return out.numpy().transpose(0, 2, 3, 1)  # [B, H, W, C]


def _forward(unet_config):
  model = unet_config.make()

  @jax.jit
  def fwd(params, x, t, y=None):
    with jax.default_matmul_precision('highest'):
      return model.apply({'params': params}, x, t, y=y)
  return fwd


def _rel_err(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _save(model, folder, scheduler=None, **kwargs):
  import diffusers  # pylint: disable=g-import-not-at-top,redefined-outer-name
  model.save_pretrained(os.path.join(folder, 'unet'), **kwargs)
  (scheduler or diffusers.DDPMScheduler(variance_type='fixed_large')).save_pretrained(
      os.path.join(folder, 'scheduler'))
  return folder


# ------------------------------------------------------------------------------------------
# The configurations (no U-Net compiled).
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_presets_have_the_papers_parameter_counts():
  for name, want in (('cifar10', 35_746_307), ('celebahq', 113_673_219),
                     ('church', 113_673_219), ('bedroom', 113_673_219), ('cat', 113_673_219)):
    model, shape = dc.unet_config_from_diffusers(dc.PRESETS[name].unet)
    params = jax.eval_shape(dc._init_fn(model, shape), jax.random.PRNGKey(0))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == want, name


@pytest.mark.parametrize('name,config_module', [
    ('cifar10', 'cifar10'), ('celebahq', 'celeba_hq256'), ('church', 'lsun_church'),
    ('bedroom', 'lsun_bedroom'), ('cat', 'lsun_cat')])
def test_presets_are_the_configs_in_configs(name, config_module):
  """The spec an import of a preset writes differs from the spec train.py builds from the
  matching configs/*.py only in fields free to change on resume (run, eval)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.spec import ExperimentSpec, differences  # pylint: disable=g-import-not-at-top
  preset = dc.PRESETS[name]
  config = importlib.import_module(f'configs.{config_module}').get_config()
  model, shape = dc.unet_config_from_diffusers(preset.unet)
  info = input_pipeline.ImageDatasetInfo(name=config.data.dataset, image_shape=shape,
                                         num_classes=0, num_examples={})
  from_config = ExperimentSpec.from_config(config, info)
  imported = dc.build_spec(model, shape, dc.diffusion_from_scheduler(preset.scheduler),
                           dataset=preset.dataset, preset=preset)
  fixed, _ = differences(from_config, imported)
  assert fixed == []
  assert imported.run.num_train_steps == from_config.run.num_train_steps
  assert imported.model == from_config.model  # every UNetConfig field, dropout included


def test_the_256px_presets_share_an_architecture_so_only_cifar10_is_found_alone():
  assert dc.find_preset(dc.PRESETS['cifar10'].unet) == 'cifar10'
  assert dc.find_preset(dc.PRESETS['church'].unet) is None


@pytest.mark.parametrize('field,value,message', [
    ('down_block_types', ('DownBlock2D', 'CrossAttnDownBlock2D'), "'CrossAttnDownBlock2D'"),
    ('time_embedding_type', 'fourier', "time_embedding_type='fourier'"),
    ('flip_sin_to_cos', True, 'flip_sin_to_cos=True'),
    ('freq_shift', 0, 'freq_shift=0'),
    ('norm_eps', 1e-5, 'norm_eps=1e-05'),
    ('downsample_padding', 1, 'downsample_padding=1'),
    ('resnet_time_scale_shift', 'scale_shift', "resnet_time_scale_shift='scale_shift'"),
    ('up_block_types', ('UpBlock2D', 'AttnUpBlock2D'), 'same levels'),
    ('block_out_channels', (32, 48), 'multiple of the first'),
    ('act_fn', 'gelu', "act_fn='gelu'"),
    ('class_embed_type', 'timestep', "class_embed_type='timestep'"),
    ('cross_attention_dim', 512, 'cross_attention_dim=512'),
])
def test_unrepresentable_unet_configs_are_refused_in_one_line(field, value, message):
  cfg = dict(dc.PRESETS['cifar10'].unet, down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
             up_block_types=('AttnUpBlock2D', 'UpBlock2D'), block_out_channels=(32, 64))
  cfg[field] = value
  with pytest.raises(dc.ConversionError, match=message) as e:
    dc.unet_config_from_diffusers(cfg)
  assert '\n' not in str(e.value)


def test_unet_config_round_trips_through_diffusers_form():
  for preset in dc.PRESETS.values():
    model, shape = dc.unet_config_from_diffusers(preset.unet)
    assert dc.unet_config_from_diffusers(dc.diffusers_config_from_unet(model, shape)) == (
        model, shape)


def test_export_refuses_what_unet2dmodel_cannot_express():
  model, shape = dc.unet_config_from_diffusers(dc.PRESETS['cifar10'].unet)
  for change, message in ((dict(resblock_scale_shift=True), 'resblock_scale_shift=True'),
                          (dict(conv_shortcut=True), 'conv_shortcut=True'),
                          (dict(ch_mult=(2, 2)), 'ch_mult'),
                          (dict(time_embedding='fourier'), "time_embedding='fourier'")):
    with pytest.raises(dc.ConversionError, match=message):
      dc.diffusers_config_from_unet(dataclasses.replace(model, **change), shape)
  # Several heads of one width map to attention_head_dim; widths that differ do not.
  cifar_heads = dataclasses.replace(model, num_heads=4)
  assert dc.diffusers_config_from_unet(cifar_heads, shape)['attention_head_dim'] == 64
  two_widths = dataclasses.replace(model, num_heads=4, ch_mult=(1, 2, 2, 4))
  with pytest.raises(dc.ConversionError, match='model.num_heads=4'):
    dc.diffusers_config_from_unet(two_widths, shape)


@pytest.mark.parametrize('schedule', ['linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'])
@pytest.mark.parametrize('zero_snr', [False, True])
def test_scheduler_betas_equal_diffusers(schedule, zero_snr, diffusers):
  cfg = dict(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule=schedule,
             rescale_betas_zero_snr=zero_snr)
  theirs = diffusers.DDPMScheduler(**dict(cfg, rescale_betas_zero_snr=False)).betas.double()
  if zero_snr:
    # diffusers rescales in float32, which costs ~1e-3 of the smallest betas: apply its
    # function to its schedule in float64 instead.
    from diffusers.schedulers import scheduling_ddpm  # pylint: disable=g-import-not-at-top
    theirs = scheduling_ddpm.rescale_zero_terminal_snr(theirs)
  ours = dc.diffusion_from_scheduler(cfg).diffusion.betas()
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-7)


def test_scheduler_fields_map_both_ways(diffusers):
  for variance, var_type in (('fixed_small', 'fixedsmall'), ('fixed_large', 'fixedlarge'),
                             ('learned_range', 'learned_range')):
    for prediction, mean_type in (('epsilon', 'eps'), ('sample', 'xstart'),
                                  ('v_prediction', 'v')):
      for clip in (True, False):
        cfg = dict(variance_type=variance, prediction_type=prediction, clip_sample=clip,
                   beta_schedule='scaled_linear', num_train_timesteps=400)
        facts = dc.diffusion_from_scheduler(cfg)
        assert facts.diffusion.parameterization == gd.Parameterization(mean_type, var_type)
        assert facts.clip_sample is clip and facts.diffusion.schedule == 'quad'
        model, shape = dc.unet_config_from_diffusers(dc.PRESETS['cifar10'].unet)
        model = dataclasses.replace(model, out_ch=6 if variance == 'learned_range' else 3)
        spec = dc.build_spec(model, shape, facts, dataset='cifar10')
        back = dc.scheduler_config_from_spec(spec)
        for k, v in cfg.items():
          assert back[k] == v, k
        diffusers.DDPMScheduler.from_config(back)  # diffusers accepts it
  for field, value in (('variance_type', 'learned'), ('prediction_type', 'flow'),
                       ('thresholding', True), ('beta_schedule', 'exp')):
    with pytest.raises(dc.ConversionError, match=f'{field}='):
      dc.diffusion_from_scheduler({field: value})


def test_schedules_diffusers_lacks_are_exported_as_trained_betas(diffusers):
  model, shape = dc.unet_config_from_diffusers(dc.PRESETS['cifar10'].unet)
  facts = dc.diffusion_from_scheduler(None)
  facts = dc.SchedulerFacts(dataclasses.replace(facts.diffusion, schedule='jsd'), True)
  spec = dc.build_spec(model, shape, facts, dataset='cifar10')
  theirs = diffusers.DDPMScheduler.from_config(dc.scheduler_config_from_spec(spec))
  np.testing.assert_allclose(theirs.betas.double().numpy(), spec.diffusion.betas(), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The CIFAR-10 model: diffusers' outputs, through the folder, the workdir and back.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def cifar(tmp_path_factory, torch, diffusers):
  """The paper's CIFAR-10 U-Net in diffusers with perturbed weights, saved and imported;
  our jitted forward pass on the EMA parameters as the readers restore them."""
  base = tmp_path_factory.mktemp('cifar')
  torch.manual_seed(SEED)
  theirs = _perturb(diffusers.UNet2DModel(**{k: v for k, v in dc.PRESETS['cifar10'].unet.items()
                                             if not k.startswith('_')}), SEED)
  src = _save(theirs, str(base / 'src'))
  workdir = str(base / 'workdir')
  spec = dc.import_checkpoint(src, workdir)
  trained = trained_model.load_ema_params(workdir)
  params = jax.device_get(trained.ema_params)
  return dict(base=base, theirs=theirs, src=src, workdir=workdir, spec=spec, trained=trained,
              params=params, fwd=_forward(spec.model))


@pytest.mark.slow
def test_cifar10_import_computes_what_diffusers_computes(cifar):
  assert cifar['spec'].data.dataset == 'cifar10'  # found as the cifar10 preset
  x, t = _inputs(SEED, 4, (32, 32, 3))
  theirs = _theirs(cifar['theirs'], x, t)
  err = _rel_err(cifar['fwd'](cifar['params'], x, t), theirs)
  print(f'max relative error {err:.2e}')
  assert err <= RTOL


@pytest.mark.slow
def test_swapped_up_blocks_fail_the_comparison(cifar):
  """The teeth: levels 2 and 3 on the way up have the same shapes; exchanging their blocks
  (a mis-mapped up-path order) must fail the comparison by far."""
  params = dict(cifar['params'])
  for j in range(3):
    a, b = f'up_2_block_{j}', f'up_3_block_{j}'
    params[a], params[b] = params[b], params[a]
  x, t = _inputs(SEED, 4, (32, 32, 3))
  err = _rel_err(cifar['fwd'](params, x, t), _theirs(cifar['theirs'], x, t))
  print(f'swapped: max relative error {err:.2e}')
  assert err > 1e3 * RTOL


@pytest.mark.slow
def test_export_round_trip_is_exact_and_diffusers_loads_and_runs_it(cifar, torch, diffusers):
  out = dc.export_checkpoint(cifar['workdir'], str(cifar['base'] / 'exported'))
  unet = diffusers.UNet2DModel.from_pretrained(str(out), subfolder='unet').eval()
  scheduler = diffusers.DDPMScheduler.from_pretrained(str(out), subfolder='scheduler')
  assert scheduler.config.variance_type == 'fixed_large' and scheduler.config.clip_sample
  # ours -> diffusers: the very tensors that were imported.
  original = cifar['theirs'].state_dict()
  exported = unet.state_dict()
  assert set(exported) == set(original)
  for k, v in original.items():
    assert torch.equal(exported[k], v), k
  # -> ours again: identical parameters.
  again = str(cifar['base'] / 'again')
  dc.import_checkpoint(str(out), again)
  back = jax.device_get(trained_model.load_ema_params(again).ema_params)
  jax.tree.map(np.testing.assert_array_equal, back, cifar['params'])
  # diffusers' output of the exported model equals ours.
  x, t = _inputs(SEED + 1, 2, (32, 32, 3))
  assert _rel_err(cifar['fwd'](cifar['params'], x, t), _theirs(unet, x, t)) <= RTOL
  pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
  images = pipe(batch_size=1, num_inference_steps=2, output_type='np',
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, 32, 32, 3) and np.all(np.isfinite(images))


@pytest.mark.slow
def test_one_ddpm_step_equals_diffusers(cifar, monkeypatch, torch, diffusers):
  """One ancestral step t = 617 → 616: the ddpm solver on the 2-level schedule of those nodes
  (one step, N = 1: its noise is fold_in(rng, 1)) against DDPMScheduler.step."""
  trained = cifar['trained']
  process = continuous.VPProcess.from_diffusion(trained.diffusion)
  x, _ = _inputs(SEED + 2, 2, (32, 32, 3))
  rng = jax.random.PRNGKey(SEED)
  denoise = lambda x_t, tt: cifar['fwd'](cifar['params'], x_t, tt)
  denoiser = sampler_lib.model_denoiser(
      denoise, process, sampler=SamplerConfig('ddpm', clip_denoised=True),
      parameterization=trained.parameterization)
  sched = solvers.schedule_from_times(process, process.t_nodes[np.array([617, 616])])
  ours = solvers.ddpm(denoiser, jnp.asarray(x), sched, rng,
                      variance=trained.parameterization.var_type)
  noise = np.array(jax.random.normal(jax.random.fold_in(rng, 1), x.shape, jnp.float32))  # its z
  from diffusers.schedulers import scheduling_ddpm  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                      lambda *a, **k: torch.from_numpy(noise.transpose(0, 3, 1, 2)))
  scheduler = diffusers.DDPMScheduler.from_pretrained(cifar['src'], subfolder='scheduler')
  out = _theirs(cifar['theirs'], x, np.array([617, 617], np.int32))
  theirs = scheduler.step(torch.from_numpy(out.transpose(0, 3, 1, 2)), 617,
                          torch.from_numpy(x.transpose(0, 3, 1, 2))).prev_sample
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  err = _rel_err(ours, theirs)
  print(f'DDPM step: max relative error {err:.2e}')
  assert err <= RTOL


@pytest.mark.slow
def test_ddim_steps_equal_diffusers(cifar, torch, diffusers):
  """Two DDIM steps (η = 0): t = 500 → 0 → x̂₀, diffusers' 'leading' spacing for 2 steps;
  ours the ddim solver over the levels at the nodes of timesteps 500 and 0, then `solve`'s
  final x̂₀ (what the old chain on the process respaced to {0, 500} computed).

  Given the same model outputs, the steps agree to float32 rounding (RTOL). With each side's
  own network, the network's difference (≤ RTOL · max |ε̂|) passes through the step's
  coefficient of ε̂, c = √ᾱ₀ √(1 − ᾱ₅₀₀)/√ᾱ₅₀₀ + √(1 − ᾱ₀) ≈ 3.4 at t = 500 (and ≈ 0.01 at
  t = 0), so that is the bound there: max |Δx| ≤ RTOL · Σ c_t max |ε̂_t|.
  """
  trained = cifar['trained']
  process = continuous.VPProcess.from_diffusion(trained.diffusion)
  sched = solvers.schedule_from_times(process, process.t_nodes[np.array([500, 0])])
  x, _ = _inputs(SEED + 3, 2, (32, 32, 3))
  scheduler = diffusers.DDIMScheduler.from_pretrained(cifar['src'], subfolder='scheduler')
  scheduler.set_timesteps(2)
  assert scheduler.timesteps.tolist() == [500, 0]
  sample = torch.from_numpy(x.transpose(0, 3, 1, 2))
  outs = {}
  for tt in (500, 0):
    outs[tt] = _theirs(cifar['theirs'], sample.numpy().transpose(0, 2, 3, 1),
                       np.full((2,), tt, np.int32))
    sample = scheduler.step(torch.from_numpy(outs[tt].transpose(0, 3, 1, 2)), tt, sample,
                            eta=0.0, use_clipped_model_output=True).prev_sample
  theirs = sample.numpy().transpose(0, 2, 3, 1)

  def run(denoise):
    denoiser = sampler_lib.model_denoiser(
        denoise, process, sampler=SamplerConfig('ddim', eta=0.0, clip_denoised=True),
        parameterization=trained.parameterization)
    return np.asarray(solvers.solve('ddim', denoiser, jnp.asarray(x), sched).x0)

  shared = run(lambda x_t, tt: jnp.where((tt == 500)[:, None, None, None], outs[500], outs[0]))
  err = _rel_err(shared, theirs)
  print(f'DDIM steps, the same model outputs: max relative error {err:.2e}')
  assert err <= RTOL
  ours = run(lambda x_t, tt: cifar['fwd'](cifar['params'], x_t, tt))
  ab = np.asarray(trained.diffusion.alphas_cumprod, np.float64)
  c500 = np.sqrt(ab[0]) * np.sqrt(1 - ab[500]) / np.sqrt(ab[500]) + np.sqrt(1 - ab[0])
  c0 = np.sqrt(1 - ab[0]) / np.sqrt(ab[0])
  bound = RTOL * (c500 * np.abs(outs[500]).max() + c0 * np.abs(outs[0]).max())
  diff = float(np.abs(ours - theirs).max())
  print(f'DDIM steps, own networks: max abs difference {diff:.2e}, bound {bound:.2e}')
  assert diff <= bound


# ------------------------------------------------------------------------------------------
# Other shapes and options: the 256-px architecture, heads, labels, old names, .bin.
# ------------------------------------------------------------------------------------------


def _import_and_compare(tmp_path, theirs, shape, *, y=None, save_kwargs=None, rename=None):
  src = _save(theirs, str(tmp_path / 'src'), **(save_kwargs or {}))
  if rename:
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(src, 'unet', dc.WEIGHTS_SAFETENSORS)
    save_file({rename(k): v for k, v in load_file(path).items()}, path)
  spec = dc.import_checkpoint(src, str(tmp_path / 'wd'))
  params = jax.device_get(trained_model.load_ema_params(str(tmp_path / 'wd')).ema_params)
  x, t = _inputs(SEED, 2, shape)
  err = _rel_err(_forward(spec.model)(params, x, t, None if y is None else jnp.asarray(y)),
                 _theirs(theirs, x, t, y))
  print(f'max relative error {err:.2e}')
  assert err <= RTOL
  return spec


@pytest.mark.slow
@needs_diffusers
def test_the_256px_architecture_at_reduced_width_and_size(tmp_path):
  """The 256-px models' six levels and attention at the fifth, at 1/4 the widths and 64 px
  (attention then sits at 4 px)."""
  cfg = {k: v for k, v in dc.PRESETS['church'].unet.items() if not k.startswith('_')}
  cfg.update(sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128))
  spec = _import_and_compare(tmp_path, _perturb(_unet(**cfg), SEED), (64, 64, 3))
  assert spec.model.ch_mult == (1, 1, 2, 2, 4, 4) and spec.model.attn_resolutions == (4,)


@pytest.mark.slow
@needs_diffusers
def test_heads_labels_and_old_attention_names(tmp_path):
  theirs = _perturb(_unet(attention_head_dim=16, num_class_embeds=11, in_channels=1,
                          out_channels=1), SEED)
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}

  def rename(key):
    for new, was in old.items():
      key = key.replace(f'.{new}.', f'.{was}.')
    return key
  spec = _import_and_compare(tmp_path, theirs, (32, 32, 1), y=np.array([3, 10], np.int32),
                             rename=rename)
  assert spec.model.num_head_channels == 16 and spec.model.num_classes == 10


@pytest.mark.slow
@needs_diffusers
def test_a_pytorch_bin_file_imports(tmp_path):
  _import_and_compare(tmp_path, _perturb(_unet(), SEED), (32, 32, 3),
                      save_kwargs=dict(safe_serialization=False))


def test_a_trainer_refuses_to_resume_an_ema_only_checkpoint(tmp_path):
  params = {'w': np.ones((2,), np.float32)}
  checkpointing.save_ema_only(str(tmp_path), 0, params, source='test')
  assert checkpointing.is_ema_only(str(tmp_path), 0)
  assert checkpointing.latest_good_step(str(tmp_path)) == 0
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(tmp_path)))
  try:
    with pytest.raises(ValueError, match='holds only EMA parameters'):
      checkpointing.restore_latest_good(manager, abstract_state=None, move_aside=True)
  finally:
    manager.close()
  assert os.listdir(checkpointing.checkpoint_dir(str(tmp_path))) == ['0']  # not set aside


# ------------------------------------------------------------------------------------------
# The CLI: bad input, and a workdir that sample.py and evaluate use unchanged.
# ------------------------------------------------------------------------------------------


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.tools.diffusers_checkpoint',
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)


def _fails_in_one_line(result, message, *paths):
  assert result.returncode != 0, result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], \
      result.stderr
  for p in paths:
    assert not os.path.exists(p), p


@pytest.mark.slow
@needs_diffusers
def test_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  dst = str(tmp_path / 'dst')
  _fails_in_one_line(_cli('import', str(empty), '--workdir', dst), 'no unet/config.json', dst)

  bad_block = _save(_unet(), str(tmp_path / 'bad_block'))
  path = os.path.join(bad_block, 'unet', 'config.json')
  with open(path) as f:
    cfg = json.load(f)
  cfg['down_block_types'] = ['DownBlock2D', 'SkipDownBlock2D']
  with open(path, 'w') as f:
    json.dump(cfg, f)
  _fails_in_one_line(_cli('import', bad_block, '--workdir', dst),
                     "down_block_types='SkipDownBlock2D'", dst)

  mismatch = _save(_unet(), str(tmp_path / 'mismatch'))
  path = os.path.join(mismatch, 'unet', 'config.json')
  with open(path) as f:
    cfg = json.load(f)
  cfg['block_out_channels'] = [32, 96]
  with open(path, 'w') as f:
    json.dump(cfg, f)
  _fails_in_one_line(_cli('import', mismatch, '--workdir', dst), 'has shape', dst)

  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('mine')
  good = _save(_unet(), str(tmp_path / 'good'))
  _fails_in_one_line(_cli('import', good, '--workdir', str(taken)), 'not empty')
  assert os.listdir(taken) == ['keep.txt']
  assert sorted(os.listdir(tmp_path)) == ['bad_block', 'empty', 'good', 'mismatch', 'taken']


@pytest.mark.slow
def test_sample_and_evaluate_use_an_imported_workdir_unchanged(tmp_path, child_env, diffusers):
  """A diffusers model of the digits' shape (8×8×1, T = 100), imported from the command line
  with --dataset digits: sample.py samples it, evaluate computes its bits/dim and FID."""
  theirs = _perturb(_unet(sample_size=8, in_channels=1, out_channels=1), SEED)
  src = _save(theirs, str(tmp_path / 'src'),
              scheduler=diffusers.DDPMScheduler(num_train_timesteps=100))
  workdir = str(tmp_path / 'wd')
  env = child_env['env']
  result = _cli('import', src, '--workdir', workdir, '--dataset', 'digits', '--data_dir',
                child_env['data_dir'], env=env)
  assert result.returncode == 0, result.stderr
  spec = workdir_lib.read_spec(workdir)
  assert spec.diffusion.num_timesteps == 100 and spec.data.image_shape == (8, 8, 1)
  sample = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'),
                           f'--workdir={workdir}', '--num_samples=8', '--sampler=dpmpp_2m',
                           '--steps=5'], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert sample.returncode == 0, sample.stderr[-2000:]
  with np.load(os.path.join(workdir, 'samples_dpmpp_2m_5', 'samples.npz')) as f:
    assert f['images'].shape == (8, 8, 8, 1)
  ev = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), f'--workdir={workdir}',
                       '--num_samples=8', '--bpd_examples=8', '--steps=5'], env=env, cwd=ROOT,
                      capture_output=True, text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-2000:]
  with open(os.path.join(workdir, 'eval.json')) as f:
    results = json.load(f)
  assert results['step'] == 0 and np.isfinite(results['bpd']) and np.isfinite(results['fid'])
