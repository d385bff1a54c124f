"""EDM (Karras et al. 2022): the preconditioning, the loss and its noise levels against the
paper's expressions and Gaussian closed forms; Table 1 against `make_denoiser`; Heun's order.

For data y ~ N(μ, s²) per coordinate and x = y + σn, the ideal denoiser is
D*(x; σ) = μ + s²/(s² + σ²)(x − μ), its error has variance v = s²σ²/(s² + σ²), so the EDM loss
at the ideal is λ(σ)·v, and a network output off by δ adds exactly λ c_out² δ² = δ². With
s = σ_d and μ = 0, D* = c_skip x: the ideal network output is 0.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.process import continuous
from diffusion_jax.process import edm
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import preconditioning
from diffusion_jax.sampling import solvers

try:
  from tests import helpers
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import helpers

SIGMA_DATA = 0.5


@pytest.fixture
def seed(request):
  s = abs(hash(request.node.name)) % 2**31
  print(f'seed {s}')
  return s


def _ideal_net(mu, s, sigma_data=SIGMA_DATA):
  """The exact F(c_in x; c_noise) of N(μ, s²) data: (D* − c_skip x)/c_out, σ = e^{4 c_noise}."""
  def net(xin, c_noise):
    sigma = jnp.exp(4.0 * c_noise).reshape((-1,) + (1,) * (xin.ndim - 1))
    x = xin * jnp.sqrt(jnp.square(sigma) + sigma_data ** 2)      # undo c_in
    d = mu + s ** 2 / (s ** 2 + jnp.square(sigma)) * (x - mu)
    c_skip, c_out = continuous.edm_skip_out(sigma, sigma_data)
    return (d - c_skip * x) / c_out
  return net


def test_preconditioning_and_weight_are_the_papers_in_float64():
  sigma = np.geomspace(1e-3, 200.0, 41)
  sd = 0.37
  with jax.enable_x64(True):
    c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in
                                    edm.preconditioning(jnp.asarray(sigma), sd))
    weight = np.asarray(edm.loss_weight(jnp.asarray(sigma), sd))
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-13)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-13)
  np.testing.assert_allclose(c_in, 1.0 / np.sqrt(sigma**2 + sd**2), rtol=1e-13)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4.0, rtol=1e-13)
  np.testing.assert_allclose(weight, (sigma**2 + sd**2) / (sigma * sd) ** 2, rtol=1e-13)
  np.testing.assert_allclose(weight * c_out**2, 1.0, rtol=1e-13)   # unit-variance target


def test_the_edm_process_uses_the_same_preconditioning():
  process = continuous.EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
  t = jnp.linspace(0.0, 1.0, 9)
  sigma = process.sigma(t)
  _, _, c_in, c_noise = edm.preconditioning(sigma, SIGMA_DATA)
  np.testing.assert_allclose(process.input_scale(t), c_in, rtol=1e-6)
  np.testing.assert_allclose(process.model_timestep(t), c_noise, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sigma)[[0, -1]], [0.002, 80.0], rtol=1e-6)


@pytest.mark.parametrize('sigma,mu,s', [(0.05, 0.3, 0.4), (0.6, -0.2, 0.5), (7.0, 0.1, 0.8)])
def test_the_loss_at_the_ideal_denoiser_and_off_it(seed, sigma, mu, s):
  n = 400_000
  k1, k2 = jax.random.split(jax.random.key(seed))
  y = mu + s * jax.random.normal(k1, (n, 1, 1, 1))
  noise = jax.random.normal(k2, (n, 1, 1, 1))
  sig = jnp.full((n,), sigma)
  v = s**2 * sigma**2 / (s**2 + sigma**2)
  lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
  net = _ideal_net(mu, s)
  per = np.asarray(edm.loss(net, y, sig, noise, SIGMA_DATA), np.float64)
  # λ (D* − y)² = λ v χ²₁: mean λv, standard deviation λv√2.
  assert abs(per.mean() - lam * v) <= 5 * lam * v * math.sqrt(2.0 / n), (per.mean(), lam * v)
  delta = 0.3
  off = np.asarray(edm.loss(lambda a, c: net(a, c) + delta, y, sig, noise, SIGMA_DATA))
  # The excess is exactly δ² plus a zero-mean cross term 2δ c_out √λ (D* − y)·√λ.
  excess = off.mean() - per.mean()
  assert abs(excess - delta**2) <= 5 * 2 * delta * math.sqrt(lam * v) * math.sqrt(
      lam) * (sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)) / math.sqrt(n), excess


def test_the_ideal_network_output_is_zero_when_the_data_scale_is_sigma_data(seed):
  x = jax.random.normal(jax.random.key(seed), (64, 4, 4, 1)) * 3.0
  sigma = jnp.geomspace(0.002, 80.0, 64)
  _, _, c_in, c_noise = edm.preconditioning(sigma, SIGMA_DATA)
  f = _ideal_net(0.0, SIGMA_DATA)(c_in[:, None, None, None] * x, c_noise)
  assert float(jnp.max(jnp.abs(f))) < 1e-5


def test_log_sigma_is_normal_with_the_papers_mean_and_std(seed):
  """Kolmogorov–Smirnov distance of ln σ to N(P_mean, P_std²) under the DKW bound at 1e-6."""
  n = 100_000
  p_mean, p_std = -1.2, 1.2
  log_sigma = np.sort(np.log(np.asarray(edm.sample_sigma(jax.random.key(seed), (n,), p_mean,
                                                         p_std), np.float64)))
  from scipy.stats import norm  # pylint: disable=g-import-not-at-top
  cdf = norm.cdf(log_sigma, loc=p_mean, scale=p_std)
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  bound = math.sqrt(math.log(2 / 1e-6) / (2 * n))
  assert ks < bound, (ks, bound)


# ------------------------------------------------------------------------------------------
# Table 1 as code: every model's D(x̃; σ̃) is the x̂₀ that `make_denoiser` computes.
# ------------------------------------------------------------------------------------------


def _processes():
  return {'vp': helpers.linear_vp_process(1000),
          've': continuous.VEProcess(sigma_min=0.01, sigma_max=50.0),
          'subvp': continuous.SubVPProcess(),
          'edm': continuous.EDMProcess(),
          'flow': continuous.FlowProcess()}


@pytest.mark.parametrize('kind,mean_type', [
    ('vp', 'eps'), ('vp', 'xstart'), ('vp', 'v'), ('ve', 'eps'), ('ve', 'score'),
    ('subvp', 'eps'), ('subvp', 'v'), ('edm', 'edm'), ('flow', 'flow'), ('flow', 'v'),
    ('flow', 'eps')])
def test_table_one_reproduces_the_denoiser_of_each_code_path(seed, kind, mean_type):
  process = _processes()[kind]
  k1, k2 = jax.random.split(jax.random.key(seed))
  b = 16
  t = jax.random.uniform(k1, (b,), minval=process.t_min + 1e-3, maxval=process.t_max)
  x = jax.random.normal(k2, (b, 4, 4, 2)) * process.sigma(t)[:, None, None, None] * 1.5
  w = jnp.linspace(-1.0, 1.0, 2)

  def net(xin, c_noise):   # some network of (input, noise coordinate)
    return jnp.tanh(xin * 1.3 + w) * (1.0 + 0.1 * jnp.sin(3.0 * c_noise))[:, None, None, None]

  want, _ = continuous.make_denoiser(process, net, mean_type)(x, t)
  alpha = process.alpha(t)[:, None, None, None]
  sigma_tilde = jnp.exp(-process.lam(t))
  c_skip, c_out, c_in, c_noise = preconditioning.coefficients(process, mean_type, sigma_tilde)
  bc = lambda c: c[:, None, None, None]
  x_tilde = x / alpha
  got = bc(c_skip) * x_tilde + bc(c_out) * net(bc(c_in) * x_tilde, c_noise)
  # Table 1 is written in σ̃, so the check goes t → λ → t in float32; sub-VP's inverse t(λ)
  # loses ~1e-4 of t near t = 1 (its c_noise is 999 t), and the flow's α = 1 − t keeps ~1e-4
  # of its relative precision near t_max = 0.999; the others are exact to rounding. There
  # x̃ = x/α reaches 40 (sub-VP) or ε's x̂₀ = (x − σε)/α is magnified by 1/α (flow): the error
  # is relative to that scale.
  atol = 1e-4 * float(jnp.max(jnp.abs(want))) if kind in ('subvp', 'flow') else 5e-5
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol)


def test_round_sigma_lands_on_the_models_timesteps():
  process = helpers.linear_vp_process(1000)
  sigma_tilde = jnp.geomspace(0.01, 150.0, 50)
  rounded = preconditioning.round_sigma(process, sigma_tilde)
  n = process.model_timestep(process.t_of_lambda(-jnp.log(rounded)))
  np.testing.assert_allclose(n, np.round(n), atol=2e-3)


# ------------------------------------------------------------------------------------------
# Sampling: Heun in σ-space is of order 2 on the ideal Gaussian denoiser.
# ------------------------------------------------------------------------------------------


def test_heun_converges_at_order_two_in_sigma(seed):
  mu, s = 0.2, 0.7
  process = continuous.EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
  denoiser = continuous.make_denoiser(process, _ideal_net(mu, s), 'edm')
  x_t = 80.0 * jax.random.normal(jax.random.key(seed), (256, 1, 1, 1))
  # The exact PF-ODE flow of Gaussian data: x(σ) − μ scales with √(s² + σ²).
  exact = mu + (x_t - mu) * math.sqrt(s**2 + 0.002**2) / math.sqrt(s**2 + 80.0**2)
  errors = []
  for n in (8, 16, 32):
    sched = solvers.step_schedule(process, n, 'karras')
    x_end = jax.jit(lambda x, sched=sched: solvers.heun(denoiser, x, sched))(x_t)
    errors.append(float(jnp.max(jnp.abs(x_end - exact))))
  orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
  print('heun errors', errors, 'orders', orders)
  assert all(1.7 < o < 2.5 for o in orders), (errors, orders)


def _edm_sampler_float64(denoise, latents, num_steps=18, sigma_min=0.002, sigma_max=80.0,
                         rho=7.0):
  """Karras et al.'s deterministic sampler (Algorithm 1 with their code's t_N = 0), re-derived
  in float64 NumPy: Heun between the ρ-spaced levels, Euler for the last step to σ = 0."""
  i = np.arange(num_steps)
  t = (sigma_max ** (1 / rho) + i / (num_steps - 1)
       * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  t = np.append(t, 0.0)
  x = latents * t[0]
  for k in range(num_steps):
    d = (x - denoise(x, t[k])) / t[k]
    x_next = x + (t[k + 1] - t[k]) * d
    if k < num_steps - 1:
      d2 = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
      x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
    x = x_next
  return x


def test_heun_on_karras_levels_is_edms_sampler_with_35_evaluations(seed):
  """The digits_edm / cifar10_edm sampler (heun, 17 steps, the final x̂₀) equals EDM's 18
  levels with the Euler step to σ = 0, evaluation for evaluation (35)."""
  mu, s = 0.2, 0.7
  process = continuous.EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
  denoiser = continuous.make_denoiser(process, _ideal_net(mu, s), 'edm')
  z = np.random.default_rng(seed).standard_normal((256, 1, 1, 1))
  ideal = lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
  want = _edm_sampler_float64(ideal, z)
  out = jax.jit(lambda x: solvers.solve('heun', denoiser, x,
                                        solvers.step_schedule(process, 17, 'karras')))(
                                            jnp.asarray(80.0 * z, jnp.float32))
  assert int(out.nfe) == 35
  print("max diff", np.abs(np.asarray(out.x0) - want).max())
  np.testing.assert_allclose(np.asarray(out.x0), want, atol=2e-5, rtol=0, err_msg=f'seed {seed}')


def test_bad_edm_settings_are_one_line_errors():
  for kwargs, fragment in [(dict(sigma_data=0.0), 'sigma_data must be'),
                           (dict(sigma_min=80.0, sigma_max=0.002), 'sigma_min must be')]:
    with pytest.raises(ValueError, match=fragment) as e:
      continuous.EDMProcess(**kwargs)
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match="mean_type 'edm'"):
    continuous.make_denoiser(continuous.VEProcess(), lambda x, t: x, 'edm')
  with pytest.raises(ValueError, match="not the discrete DDPM"):
    gd.p_mean_variance(gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, 10)),
                       jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)),
                       jnp.zeros((1,), jnp.int32), mean_type='edm', var_type='fixedsmall')


# ------------------------------------------------------------------------------------------
# The spec, the EMA by half-life, and a run through the CLIs.
# ------------------------------------------------------------------------------------------


def _edm_spec(**changes):
  return helpers.digits_spec('digits_edm', **changes)


def test_the_edm_spec_builds_the_edm_process_and_is_fixed_on_resume():
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  spec = _edm_spec()
  process = spec.diffusion.make_process()
  assert isinstance(process, continuous.EDMProcess)
  assert (process.sigma_min, process.sigma_max, process.sigma_data) == (0.002, 80.0, 0.75)
  assert spec_lib.ExperimentSpec.from_json(spec.to_json()) == spec
  for key, value in (('diffusion.sigma_data', 0.5), ('diffusion.p_std', 1.0),
                     ('diffusion.p_mean', -1.0), ('diffusion.sigma_max', 60.0)):
    fixed, _ = spec_lib.differences(spec, _edm_spec(**{key: value}))
    assert [name for name, _, _ in fixed] == [key], fixed
  # A spec.json written before the EDM fields reads as the paper's values, unchanged.
  stored = _edm_spec(**{'diffusion.sigma_data': 0.5}).to_json()
  for k in ('sigma_data', 'p_mean', 'p_std'):
    del stored['diffusion'][k]
  del stored['training']['ema_halflife_kimg'], stored['training']['ema_rampup_ratio']
  new = _edm_spec(**{'diffusion.sigma_data': 0.5})
  assert spec_lib.differences(stored, new)[0] == []


@pytest.mark.parametrize('changes, fragments', [
    ({'diffusion.sigma_data': 0.0}, ('sigma_data', '0.0')),
    ({'diffusion.sigma_min': 80.0, 'diffusion.sigma_max': 0.002}, ('sigma_min', 'sigma_max')),
    ({'diffusion.p_std': 0.0}, ('p_std', '0.0')),
    ({'diffusion.process': 'vp'}, ("'edm'", "'vp'")),
    ({'diffusion.objective': 'dsm'}, ("'edm'", "'dsm'")),
    ({'diffusion.mean_type': 'eps'}, ("mean_type 'edm'", "'eps'")),
    ({'diffusion.var_type': 'learned_range'}, ("'learned_range'", "'edm'")),
    ({'diffusion.loss_type': 'hybrid'}, ("'hybrid'", "'mse'")),
    ({'diffusion.snr_gamma': 5.0}, ('snr_gamma', "'edm'")),
    ({'training.ema_halflife_kimg': -1.0}, ('ema_halflife_kimg', '-1.0')),
    ({'training.ema_warmup': True}, ('ema_warmup', 'ema_halflife_kimg')),
])
def test_bad_edm_specs_are_one_line_errors(changes, fragments):
  with pytest.raises(ValueError) as e:
    _edm_spec(**changes)
  message = str(e.value)
  assert '\n' not in message and all(f in message for f in fragments), message


def test_the_ema_half_life_is_edms():
  from diffusion_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = step_lib.StepConfig.from_spec(_edm_spec())
  batch, halflife, rampup = 64, 10_000.0, 0.05
  for n in (0, 1, 10, 3124, 3125, 3126, 20_000):
    want = 0.5 ** (batch / max(min(halflife, n * batch * rampup), 1e-8))
    got = float(step_lib.ema_decay(cfg, jnp.asarray(n, jnp.int32)))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-30), (n, got, want)


@pytest.mark.slow
def test_an_edm_run_trains_samples_and_refuses_a_changed_sigma_data(child_env, tmp_path):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / 'edm')
  edm_overrides = ['--config.diffusion.process=edm', '--config.diffusion.objective=edm',
                   '--config.diffusion.mean_type=edm', '--config.diffusion.sigma_min=0.002',
                   '--config.diffusion.sigma_max=80', '--config.training.sampler=heun',
                   '--config.training.sample_steps=3', '--config.eval.sampler=heun',
                   '--config.eval.sample_steps=3', '--config.training.ema_halflife_kimg=0.5',
                   '--config.training.ema_rampup_ratio=0.05', '--config.training.ema_warmup=False']
  run = lambda *args: subprocess.run(
      [sys.executable, *args], env=child_env['env'], cwd=root, capture_output=True, text=True,
      timeout=900)
  train = [os.path.join(root, 'train.py'), f'--config={os.path.join(root, "configs", "tiny.py")}',
           f'--workdir={workdir}', f'--config.data.data_dir={child_env["data_dir"]}']
  result = run(*train, *edm_overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  result = run(os.path.join(root, 'sample.py'), f'--workdir={workdir}', '--num_samples=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'heun, 3 steps (karras), 7 model evaluations' in result.stdout, result.stdout
  with np.load(os.path.join(workdir, 'samples_heun_3', 'samples.npz')) as f:
    assert f['images'].shape == (4, 8, 8, 1)
  # The PF-ODE likelihood runs on the EDM process as on any other (no discrete bound: no T).
  result = run(os.path.join(root, 'evaluate.py'), f'--workdir={workdir}', '--num_samples=0',
               '--bpd_examples=4', '--likelihood=ode')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'eval.json')) as f:
    results = json.load(f)
  assert results['bpd_ode_num_examples'] == 4 and 0 < results['bpd_ode'] < 20, results
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  result = run(*train, *edm_overrides, '--config.diffusion.sigma_data=0.7',
               '--config.training.num_train_steps=6')
  assert result.returncode != 0
  assert 'diffusion.sigma_data' in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


@pytest.mark.slow
def test_the_cifar10_edm_recipe_builds_the_papers_settings_on_our_unet_and_trains_a_step():
  """configs/cifar10_edm.py: the 35,746,307-parameter U-Net (35.7M; EDM's DDPM++ has 56M),
  EDM's Table 7 settings, and one step of its train_step (2 images, not the recipe's 512, on
  this CPU) with a finite loss and EDM's EMA."""
  import functools  # pylint: disable=g-import-not-at-top
  from configs import cifar10_edm  # pylint: disable=g-import-not-at-top
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training.state import TrainState  # pylint: disable=g-import-not-at-top
  info = input_pipeline.ImageDatasetInfo('cifar10', (32, 32, 3), 10, {'train': 50000})
  spec = spec_lib.ExperimentSpec.from_config(cifar10_edm.get_config(), info)
  d, t, o = spec.diffusion, spec.training, spec.optimizer
  assert (d.sigma_data, d.p_mean, d.p_std, d.sigma_min, d.sigma_max) == (0.5, -1.2, 1.2, 0.002, 80.0)
  assert (t.batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio) == (512, 500.0, 0.05)
  assert (o.learning_rate, o.warmup_steps, spec.model.dropout) == (1e-3, 19_531, 0.13)
  assert spec.run.num_train_steps * t.batch_size == 200_000_000
  assert spec.eval.sampler.kind.value == 'heun' and spec.eval.sampler.num_evaluations(1000) == 35
  params = spec.init_params(jax.random.PRNGKey(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == 35_746_307
  tx = o.make()
  cfg = step_lib.StepConfig.from_spec(spec)
  step_fn = functools.partial(step_lib.train_step, model=spec.model.make(),
                              diffusion=spec.diffusion.make(), tx=tx,
                              learning_rate_fn=o.learning_rate_schedule(), cfg=cfg)
  update = step_lib.data_parallel_step(step_fn, helpers.mesh(1))
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  state, metrics = update(state, dict(image=x, label=jnp.zeros((2,), jnp.int32)))
  assert np.isfinite(float(metrics['loss'])) and int(state.step) == 1
