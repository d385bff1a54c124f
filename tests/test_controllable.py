"""Controllable generation (`sampling.controllable`) against closed forms of Gaussian data.

- Inpainting: the known pixels come back exactly; with no known pixel the solve is the plain
  sampler's, bit for bit; for correlated Gaussian data N(μ, Σ) the unknown coordinates given
  the known ones are N(μ_u + Σ_uk Σ_kk⁻¹(k − μ_k), Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku), and the exact
  denoiser's samples are compared with it: plain replacement misses the conditional mean by a
  tenth of a standard deviation, RePaint's resampling removes most of that.
- Image-to-image: strength → 0 returns the input; for N(μ, s²) data and the ancestral chain
  the output given the input x is N(μ + Kα(x − μ), K²σ² + s²σ²/v) at the start level
  (v = α²s² + σ², K = αs²/v): the posterior of x₀ given x noised to that level.
- Classifier guidance: two Gaussian classes N(±m, s²); with the exact mixture denoiser and the
  exact classifier p(y | x_t), scale 1 samples the class's own Gaussian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import oracles
from diffusion_jax.process import continuous as ct
from diffusion_jax.sampling import controllable
from diffusion_jax.sampling import solvers
from diffusion_jax.sampling.config import SamplerConfig

PROCESS = helpers.linear_vp_process()


def _key() -> jax.Array:
  return jax.random.key(oracles.new_seed())


# ------------------------------------------------------------------------------------------
# Masks and RePaint's levels.
# ------------------------------------------------------------------------------------------


def test_repaint_levels_follow_the_papers_jump_rule():
  # Worked by hand from RePaint's rule (N = 6, jump length 2, 2 samples): jumps back at 2 and
  # at 0 steps from the end, once each.
  np.testing.assert_array_equal(controllable.repaint_levels(6, 2, 2),
                                [0, 1, 2, 3, 4, 3, 2, 3, 4, 5, 6, 5, 4, 5, 6])
  np.testing.assert_array_equal(controllable.repaint_levels(5), np.arange(6))
  levels = controllable.repaint_levels(250, 10, 10)
  assert np.all(np.abs(np.diff(levels)) == 1)
  assert int(np.sum(np.diff(levels) > 0)) == 250 + 9 * 10 * 24   # steps down
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError) as e:
      controllable.repaint_levels(10, bad, 2)
    oracles.assert_one_line_error(e.value, 'jump_length', 'integer >= 1')


def test_region_masks_and_mask_checks():
  m = controllable.region_mask('bottom', (8, 8, 1))
  assert m.shape == (8, 8, 1) and m[:4].min() == 1 and m[4:].max() == 0
  m = controllable.region_mask('center', (8, 6, 3))
  assert m[2:6, 1:5].max() == 0 and m.sum() == 3 * (48 - 16)
  assert controllable.region_mask('left', (4, 4, 1))[:, :2].max() == 0
  np.testing.assert_array_equal(controllable.check_mask(np.ones((8, 8)) * (np.arange(8) < 4)[:, None],
                                                        (8, 8, 3))[..., 2],
                                (np.arange(8) < 4)[:, None] * np.ones((8, 8)))
  cases = [(np.ones((8, 8)), 'no unknown pixel'), (np.full((8, 8), 0.5), '0 (unknown) and 1'),
           (np.zeros((4, 8, 1)), 'shape (4, 8, 1)')]
  for mask, fragment in cases:
    with pytest.raises(ValueError) as e:
      controllable.check_mask(mask, (8, 8, 1))
    oracles.assert_one_line_error(e.value, fragment)
  with pytest.raises(ValueError) as e:
    controllable.region_mask('middle', (8, 8, 1))
  oracles.assert_one_line_error(e.value, 'middle', 'bottom')


def test_controls_refuse_what_has_no_meaning():
  inpaint = controllable.Control('inpaint', jump_length=10, jump_n_sample=10)
  for kind in ('dpmpp_2m', 'ode', 'consistency', 'ald'):
    with pytest.raises(ValueError) as e:
      inpaint.check(SamplerConfig(kind))
    oracles.assert_one_line_error(e.value, repr(kind), 'ddpm, ddim, euler, heun, sde, pc')
  for kind in ('ddpm', 'ddim', 'euler', 'heun', 'sde', 'pc'):
    inpaint.check(SamplerConfig(kind))
  with pytest.raises(ValueError) as e:
    controllable.Control('image_to_image', strength=0.5).check(SamplerConfig('ode'))
  oracles.assert_one_line_error(e.value, "'ode'", 'fixed-step')
  for bad in (0.0, 1.5, -0.1, None, 'half'):
    with pytest.raises(ValueError) as e:
      controllable.Control('image_to_image', strength=bad)
    oracles.assert_one_line_error(e.value, 'strength', '(0, 1]')


# ------------------------------------------------------------------------------------------
# Inpainting.
# ------------------------------------------------------------------------------------------


def _correlated():
  """The exact denoiser of tests/oracles.py's correlated Gaussian data, and its moments."""
  den = ct.make_denoiser(PROCESS, helpers.correlated_denoise_fn(PROCESS), 'eps')
  q, ev = oracles.correlated_covariance()
  return den, oracles.CORRELATED_MU, (q * ev) @ q.T


def _conditional(mu, cov, known_values, k=(0, 1), u=(2, 3)):
  """The float64 mean and covariance of x_u given x_k = known_values."""
  k, u = list(k), list(u)
  gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
  return mu[u] + gain @ (known_values - mu[k]), cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]


@pytest.mark.parametrize('kind,options', [('ddpm', {}), ('heun', {'s_churn': 5.0}),
                                          ('pc', {}), ('ddim', {'eta': 0.5}), ('sde', {}),
                                          ('euler', {})])
def test_inpainting_keeps_the_known_pixels_and_with_none_known_is_the_sampler(kind, options):
  den, _, _ = _correlated()
  sched = (solvers.level_schedule(PROCESS, 12) if solvers.info(kind).levels
           else solvers.step_schedule(PROCESS, 12, solvers.info(kind).schedule))
  key = _key()
  known = jax.random.normal(jax.random.fold_in(key, 7), (64, 4))
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  run = jax.jit(lambda k, m, jl, jn: controllable.inpaint(
      den, sched, known, m, k, kind=kind, jump_length=jl, jump_n_sample=jn, **options),
      static_argnums=(2, 3))
  out = run(key, mask, 3, 2)
  np.testing.assert_array_equal(np.asarray(out.x0)[:, ::2], np.asarray(known)[:, ::2])
  assert not np.allclose(np.asarray(out.x0)[:, 1::2], np.asarray(known)[:, 1::2])
  # The state's known pixels at the last level: the data noised to it, α·x + σ·z.
  t_end = sched.t[-1]
  z = (np.asarray(out.x_end)[:, ::2] - float(PROCESS.alpha(t_end)) * np.asarray(known)[:, ::2]
       ) / float(PROCESS.sigma(t_end))
  assert abs(z.mean()) < 0.35 and abs(z.std() - 1.0) < 0.25, (z.mean(), z.std())
  per_step = solvers.info(kind).evaluations_per_step
  down = int(np.sum(np.diff(controllable.repaint_levels(sched.num_steps, 3, 2)) > 0))
  assert int(out.nfe) == per_step * down + 1
  # Nothing known, no jumps: the plain solve from the same key, bit for bit.
  free = run(key, jnp.zeros(4), 1, 1)
  init_rng, loop_rng = jax.random.split(key)
  x_T = PROCESS.prior_sample(init_rng, (64, 4))
  plain = jax.jit(lambda: solvers.solve(kind, den, x_T, sched, loop_rng, **options))()
  np.testing.assert_array_equal(np.asarray(free.x0), np.asarray(plain.x0))
  assert int(free.nfe) == int(plain.nfe)


def _inpaint_errors(jump_length, jump_n_sample, n=10000, kind='ddpm', steps=250, **options):
  den, mu, cov = _correlated()
  known_values = mu[:2] + np.array([0.4, -0.3])
  want_mean, want_cov = _conditional(mu, cov, known_values)
  known = jnp.zeros((n, 4)).at[:, :2].set(jnp.asarray(known_values, jnp.float32))
  sched = solvers.level_schedule(PROCESS, steps)
  out = jax.jit(lambda k: controllable.inpaint(
      den, sched, known, jnp.asarray([1.0, 1.0, 0.0, 0.0]), k, kind=kind,
      jump_length=jump_length, jump_n_sample=jump_n_sample, **options))(_key())
  x = np.asarray(out.x0, np.float64)
  np.testing.assert_array_equal(x[:, :2], np.asarray(known)[:, :2])
  mean_err = np.max(np.abs(x[:, 2:].mean(0) - want_mean))
  cov_err = np.max(np.abs(np.cov(x[:, 2:].T) - want_cov))
  print(f'{kind} {steps} jumps ({jump_length}, {jump_n_sample}): conditional mean off by '
        f'{mean_err:.4f} (sd {np.sqrt(np.diag(want_cov)).round(3)}), covariance by {cov_err:.4f}')
  return mean_err, cov_err


def test_replacement_misses_the_gaussian_conditional_and_repaint_mends_it():
  """The exact denoiser, ddpm (fixed-large) over 250 levels, 10,000 samples (standard error
  of the mean 0.003). Measured (docs/controllable.md): replacement's conditional mean is off by
  0.037, a tenth of the conditional sd 0.32, at 250 and at 1,000 levels alike (a bias of the
  method, not of the steps); RePaint (10, 10) leaves 0.007, and the covariance within 0.003."""
  replace_mean, replace_cov = _inpaint_errors(1, 1, variance='fixedlarge')
  repaint_mean, repaint_cov = _inpaint_errors(10, 10, variance='fixedlarge')
  assert replace_mean > 0.025 and replace_cov < 0.012
  assert repaint_mean < 0.016 and repaint_cov < 0.008
  assert repaint_mean < 0.5 * replace_mean


# ------------------------------------------------------------------------------------------
# Image-to-image.
# ------------------------------------------------------------------------------------------

MU, S = 0.3, 0.5


def _gaussian_denoiser():
  return ct.make_denoiser(PROCESS, helpers.gaussian_denoise_fn(PROCESS, MU, S), 'eps')


def test_image_to_image_at_strength_near_zero_returns_the_input():
  sched = solvers.level_schedule(PROCESS, 51)   # 50 steps
  x = jax.random.normal(_key(), (16, 2, 2, 1))
  for strength in (1e-6, 0.019):     # ⌊50 s⌋ = 0 steps
    out = controllable.image_to_image(_gaussian_denoiser(), sched, x, strength, _key())
    np.testing.assert_array_equal(np.asarray(out.x0), np.asarray(x))
    assert int(out.nfe) == 0
  one = controllable.image_to_image(_gaussian_denoiser(), sched, x, 0.02, _key())   # 1 step
  assert int(one.nfe) == 2   # one step from the lowest level but one, and the denoising
  sigma = float(PROCESS.sigma(sched.t[-2]))
  assert np.max(np.abs(np.asarray(one.x0) - np.asarray(x))) < 6 * sigma


@pytest.mark.parametrize('strength', [0.3, 0.7])
def test_image_to_image_samples_the_gaussian_posterior_of_the_noised_input(strength):
  sched = solvers.level_schedule(PROCESS, 1000)   # Ho's chain itself, every timestep
  n, x_in = 20000, 1.2
  images = jnp.full((n, 1, 1, 1), x_in)
  out = jax.jit(lambda k: controllable.image_to_image(
      _gaussian_denoiser(), sched, images, strength, k, kind='ddpm'))(_key())
  k = controllable.strength_steps(sched.num_steps, strength)
  t0 = float(sched.t[sched.num_steps - k])
  a, sig = float(PROCESS.alpha(t0)), float(PROCESS.sigma(t0))
  v = a * a * S * S + sig * sig
  gain = a * S * S / v
  want_mean, want_var = MU + gain * a * (x_in - MU), gain ** 2 * sig ** 2 + S * S * sig ** 2 / v
  y = np.asarray(out.x0, np.float64).ravel()
  print(f'strength {strength}: t {t0:.3f}, mean {y.mean():.4f} (want {want_mean:.4f}), var '
        f'{y.var():.4f} (want {want_var:.4f})')
  assert int(out.nfe) == k + 1
  assert abs(y.mean() - want_mean) < 5 * np.sqrt(want_var / n) + 0.005
  assert abs(y.var() / want_var - 1.0) < 0.05


# ------------------------------------------------------------------------------------------
# Classifier guidance.
# ------------------------------------------------------------------------------------------

CLASS_MEANS = np.array([-0.5, 0.5])   # class y: N(CLASS_MEANS[y], CLASS_S²) per coordinate
CLASS_S = 0.2


def _mixture(x, t):
  """(log p(y | x_t) [B, 2], E[x₀ | x_t]) of the two-class mixture, exactly."""
  shape = (-1,) + (1,) * (x.ndim - 1)
  a = jnp.reshape(PROCESS.alpha(t), shape)
  sig = jnp.reshape(PROCESS.sigma(t), shape)
  v = a * a * CLASS_S ** 2 + sig * sig
  axes = tuple(range(1, x.ndim))
  logits = jnp.stack([-jnp.sum((x - a * m) ** 2, axes) / (2 * v[:, 0, 0, 0])
                      for m in CLASS_MEANS], -1)
  logp = jax.nn.log_softmax(logits, -1)                                # [B, 2]
  x0_y = [(a * CLASS_S ** 2 * x + sig * sig * m) / v for m in CLASS_MEANS]
  w = jnp.exp(logp)
  x0 = sum(jnp.reshape(w[:, y], shape) * x0_y[y] for y in range(2))
  return logp, x0


def _mixture_denoiser(x, t):
  _, x0 = _mixture(x, t)
  shape = (-1,) + (1,) * (x.ndim - 1)
  a, sig = jnp.reshape(PROCESS.alpha(t), shape), jnp.reshape(PROCESS.sigma(t), shape)
  return x0, (x - a * x0) / sig


@pytest.mark.parametrize('label', [0, 1])
def test_classifier_guidance_at_scale_one_samples_the_class_gaussian(label):
  n = 4000
  labels = jnp.full((n,), label)
  log_prob = lambda x, t: jnp.take_along_axis(_mixture(x, t)[0], labels[:, None], -1)[:, 0]
  sched = solvers.step_schedule(PROCESS, 40, 'karras')
  key = _key()
  x_T = PROCESS.prior_sample(key, (n, 1, 1, 2))

  def draw(scale):
    den = controllable.classifier_guided(_mixture_denoiser, PROCESS, log_prob, scale)
    return np.asarray(jax.jit(lambda: solvers.solve('heun', den, x_T, sched))().x0, np.float64)

  guided, plain = draw(1.0), draw(0.0)
  want = CLASS_MEANS[label]
  print(f'label {label}: guided mean {guided.mean():.4f} sd {guided.std():.4f}; unguided mean '
        f'{plain.mean():.4f}')
  assert abs(guided.mean() - want) < 0.01
  assert abs(guided.std() / CLASS_S - 1.0) < 0.05   # Heun-40 measured +1.5% to +3%
  assert abs(plain.mean()) < 0.1 and plain.std() > 0.45   # both classes without guidance
  # s = 4 samples ∝ p(x)·p(y | x)⁴: pushed further from the other class, never on it.
  stronger = draw(4.0)
  assert np.sign(want) * (stronger.mean() - want) > 0.05
  assert np.all(np.sign(want) * stronger.mean(axis=(1, 2, 3)) > 0)


# ------------------------------------------------------------------------------------------
# The noise-conditional classifier: spec, network, loss.
# ------------------------------------------------------------------------------------------

from diffusion_jax import spec as spec_lib   # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax.data import input_pipeline   # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax.training import step as step_lib   # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DIGITS = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500, 'test': 297})


def _classifier_config():
  from configs import digits_classifier  # pylint: disable=g-import-not-at-top
  return digits_classifier.get_config()


def test_the_classifier_recipe_is_a_classifier_of_the_defaults_process():
  from configs import digits  # pylint: disable=g-import-not-at-top
  spec = spec_lib.ExperimentSpec.from_config(_classifier_config(), DIGITS)
  model = spec_lib.ExperimentSpec.from_config(digits.get_config(), DIGITS)
  assert spec.is_classifier and not model.is_classifier
  assert (spec.model.head, spec.model.out_ch, spec.model.num_classes) == ('classifier', 10, None)
  for f in ('process', 'schedule', 'num_timesteps', 'beta_start', 'beta_end'):
    assert getattr(spec.diffusion, f) == getattr(model.diffusion, f)
  params = jax.eval_shape(spec.init_params, jax.random.key(0))
  assert 'logits' in params and not any(k.startswith('up_') for k in params)
  logits = jax.eval_shape(lambda p: spec.model.make().apply(
      {'params': p}, jnp.zeros((3, 8, 8, 1)), jnp.zeros((3,))), params)
  assert logits.shape == (3, 10)
  assert spec_lib.ExperimentSpec.from_json(spec.to_json()) == spec
  with pytest.raises(ValueError) as e:
    spec.check_sampler(spec.eval.sampler)
  oracles.assert_one_line_error(e.value, 'classifier', '--classifier')


@pytest.mark.parametrize('change,fragment', [
    (('training', 'sample_every_steps', 100), 'sample_every_steps=0'),
    (('model', 'class_conditional', True), 'class_conditional=False'),
])
def test_a_classifier_that_cannot_be_one_is_one_line(change, fragment):
  config = _classifier_config()
  group, name, value = change
  config[group][name] = value
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(config, DIGITS)
  oracles.assert_one_line_error(e.value, fragment)
  unlabelled = input_pipeline.ImageDatasetInfo('faces', (8, 8, 1), 0, {'train': 10})
  with pytest.raises(ValueError) as e:
    spec_lib.ExperimentSpec.from_config(_classifier_config(), unlabelled)
  oracles.assert_one_line_error(e.value, 'labelled dataset')


def test_the_classifier_loss_is_the_cross_entropy_of_the_noised_image_at_its_time():
  """An exact classifier of two Gaussian classes, fed as the network is (c_in·x and the
  model timestep), gets −log p(y | x_t) of float64 NumPy at the drawn t and noise."""
  rng, _ = oracles.new_rng()
  n = 64
  labels = rng.integers(0, 2, n)
  x0 = (CLASS_MEANS[labels][:, None, None, None] + CLASS_S * rng.standard_normal((n, 1, 1, 2)))
  t = rng.uniform(PROCESS.t_min, 1.0, n)
  z = rng.standard_normal((n, 1, 1, 2))

  def exact_logits(x_scaled, timestep):   # what the network gets
    tt = helpers.model_time(PROCESS, timestep)
    return _mixture(x_scaled / jnp.reshape(PROCESS.input_scale(tt), (-1, 1, 1, 1)), tt)[0]

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  terms = step_lib.classifier_terms(PROCESS, exact_logits, f32(x0), f32(t), f32(z),
                                    jnp.asarray(labels))
  a = np.asarray(PROCESS.alpha(f32(t)), np.float64)[:, None, None, None]
  sig = np.asarray(PROCESS.sigma(f32(t)), np.float64)[:, None, None, None]
  x_t = a * x0 + sig * z
  v = (a * CLASS_S) ** 2 + sig ** 2
  logits = np.stack([-np.sum((x_t - a * m) ** 2, axis=(1, 2, 3)) / (2 * v[:, 0, 0, 0])
                     for m in CLASS_MEANS], -1)
  want = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1) \
      - logits[np.arange(n), labels]
  np.testing.assert_allclose(np.asarray(terms['loss']), want, rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(terms['accuracy']),
                                (np.argmax(logits, 1) == labels).astype(np.float32))


# ------------------------------------------------------------------------------------------
# sample.py.
# ------------------------------------------------------------------------------------------


def test_read_images_and_masks_from_files(tmp_path, rng):
  from diffusion_jax import trained_model as tm  # pylint: disable=g-import-not-at-top
  from diffusion_jax.storage import images as images_lib  # pylint: disable=g-import-not-at-top
  images = rng.integers(0, 255, (5, 8, 8, 1)).astype(np.uint8)
  np.savez(tmp_path / 'x.npz', images=images)
  np.testing.assert_array_equal(tm.read_images(tmp_path / 'x.npz', (8, 8, 1)), images)
  for scale in (1, 4):
    images_lib.save_png(tmp_path / f'g{scale}.png', images_lib.make_grid(images), scale)
    np.testing.assert_array_equal(tm.read_images(tmp_path / f'g{scale}.png', (8, 8, 1)), images)
  np.savez(tmp_path / 'f.npz', images=images.astype(np.float32))
  np.savez(tmp_path / 's.npz', images=images[:, :4])
  for name, fragment in (('f.npz', 'float32'), ('s.npz', 'shape (5, 4, 8, 1)'),
                         ('none.npz', 'not found')):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      tm.read_images(tmp_path / name, (8, 8, 1))
    oracles.assert_one_line_error(e.value, fragment)
  assert tm.read_mask('top', (8, 8, 1))[:4].max() == 0
  images_lib.save_png(tmp_path / 'm.png', np.repeat((np.arange(8) < 5)[:, None], 8, 1)[..., None]
                      .astype(np.uint8) * 255)
  np.testing.assert_array_equal(tm.read_mask(str(tmp_path / 'm.png'), (8, 8, 1))[:, 0, 0],
                                (np.arange(8) < 5).astype(np.float32))
  with pytest.raises(ValueError) as e:
    tm.read_mask('upper', (8, 8, 1))
  oracles.assert_one_line_error(e.value, "'upper'", 'top, bottom')


@pytest.mark.slow
def test_sample_py_inpaints_edits_and_guides_and_refuses_bad_inputs(child_env, trained_master,
                                                                  tmp_path):
  """The trained tiny workdir: --inpaint returns the known pixels exactly (replacement and
  RePaint), --init/--strength edits, a tiny classifier trained by train.py guides; each bad
  input is one line with nothing written."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  import workdirs  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run([sys.executable, os.path.join(root, 'sample.py'),
                                      f'--workdir={trained_master}', *args],
                                     env=child_env['env'], cwd=root, capture_output=True,
                                     text=True, timeout=900)
  x, _ = helpers.digits('test')
  np.savez(tmp_path / 'digits.npz', images=x[:8])
  images = f'--images={tmp_path / "digits.npz"}'
  out = tmp_path / 'inpainted'
  helpers.assert_ok(run('--inpaint', images, '--mask=bottom', '--sampler=ddpm', '--steps=10',
                        '--jump_length=3', '--jump_n_sample=2', f'--output={out}'))
  with np.load(out / 'samples.npz') as z:
    np.testing.assert_array_equal(z['images'][:, :4], x[:8, :4])
    np.testing.assert_array_equal(z['inputs'], x[:8])
    assert z['masks'][:, 4:].max() == 0 and z['masks'][:, :4].min() == 1
  assert (out / 'grid.png').exists()
  edited = tmp_path / 'edited'
  result = helpers.assert_ok(run(f'--init={tmp_path / "digits.npz"}', '--strength=0.5',
                                 '--sampler=ddim', '--steps=10', f'--output={edited}'))
  assert '5 model evaluations each' in result.stdout, result.stdout
  # A classifier of the tiny process, trained by train.py.
  classifier = str(tmp_path / 'classifier')
  helpers.assert_ok(subprocess.run(
      workdirs.train_cmd(child_env['data_dir'], classifier,
                         '--config.diffusion.objective=classifier',
                         '--config.training.num_train_steps=2'),
      env=child_env['env'], cwd=root, capture_output=True, text=True, timeout=900))
  guided = tmp_path / 'guided'
  helpers.assert_ok(run(f'--classifier={classifier}', '--classifier_scale=2', '--label=3',
                        '--num_samples=8', '--sampler=ddim', '--steps=5', f'--output={guided}'))
  with np.load(guided / 'samples.npz') as z:
    assert z['images'].shape == (8, 8, 8, 1) and set(z['labels']) == {3}
  # Bad inputs: one line each, nothing written.
  np.savez(tmp_path / 'wide.npz', images=np.zeros((2, 8, 6, 1), np.uint8))
  bad = tmp_path / 'bad'
  cases = [
      (('--inpaint', f'--images={tmp_path / "wide.npz"}', '--mask=top'), 'shape (2, 8, 6, 1)'),
      (('--inpaint', images, '--mask=sideways'), "'sideways'"),
      (('--inpaint', images, '--mask=bottom', '--sampler=dpmpp_2m'), "'dpmpp_2m'"),
      ((f'--init={tmp_path / "digits.npz"}', '--strength=1.5'), '(0, 1]'),
      ((f'--init={tmp_path / "digits.npz"}', '--strength=0'), '(0, 1]'),
      ((f'--classifier={trained_master}',), 'is not a classifier'),
      (('--classifier_scale=2',), '--classifier WORKDIR'),
  ]
  for args, fragment in cases:
    helpers.assert_one_error_line(run(*args, f'--output={bad}'), fragment)
  np.save(tmp_path / 'allknown.npy', np.ones((8, 8)))
  np.savez(tmp_path / 'allknown.npz', mask=np.ones((8, 8)))
  helpers.assert_one_error_line(run('--inpaint', images, f'--mask={tmp_path / "allknown.npz"}',
                                    f'--output={bad}'), 'no unknown pixel')
  assert not bad.exists()


def test_a_classifier_of_another_shape_classes_or_process_is_refused(tmp_path):
  import workdirs  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax import trained_model as tm  # pylint: disable=g-import-not-at-top
  classifier = workdirs.write_workdir(str(tmp_path / 'classifier'), _classifier_config(), DIGITS)
  model = spec_lib.ExperimentSpec.from_config(digits.get_config(), DIGITS)
  assert tm.read_classifier(classifier, model).spec.is_classifier
  other_process = digits.get_config()
  other_process.diffusion.num_timesteps = 100
  five = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 5, {'train': 1500})
  wide = input_pipeline.ImageDatasetInfo('digits', (8, 16, 1), 10, {'train': 1500})
  for config, info, fragment in ((other_process, DIGITS, 'diffusion.num_timesteps is 1000'),
                                 (digits.get_config(), five, 'has 10 classes'),
                                 (digits.get_config(), wide, 'shape (8, 8, 1)')):
    with pytest.raises(ValueError) as e:
      tm.read_classifier(classifier, spec_lib.ExperimentSpec.from_config(config, info))
    oracles.assert_one_line_error(e.value, '--classifier', fragment)
  with pytest.raises(ValueError) as e:
    tm.read_classifier(workdirs.write_workdir(str(tmp_path / 'model'), digits.get_config(),
                                              DIGITS), model)
  oracles.assert_one_line_error(e.value, 'is not a classifier')
