"""Samplers of `diffusion_jax.sampling.samplers` driven by the exact denoiser of Gaussian data.

When every data coordinate is iid N(mu, s^2), x_t = a x0 + sigma eps (a = sqrt(abar_t),
sigma = sqrt(1 - abar_t)) and E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2). With that
denoiser every sampler step is an affine map of x plus Gaussian noise, so the law of the output
is computed exactly in float64 (tests/numpy_reference.py: oracle_affine_*) and compared with the
samples; deterministic samplers (DDIM with x_init, the DDIM encoder) are compared elementwise.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.sampling import samplers

try:
  from tests import numpy_reference as ref
  from tests import oracles
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import numpy_reference as ref
  import oracles

T = 1000
MU, S = 0.3, 0.5
# 2^17 scalar samples: the standard error of the sample std is 0.2%, of the mean s/362.
SAMPLE_SHAPE = (8192, 4, 4, 1)
N = int(np.prod(SAMPLE_SHAPE))


def jax_key(rng):
  return jax.random.key(int(rng.integers(2**31)))


@functools.lru_cache(maxsize=None)
def linear_process():
  betas = ref.beta_schedule("linear", T)
  return gd.GaussianDiffusion.from_betas(betas), ref.Coefs(betas)


def oracle(c, mean_type="eps"):
  """The exact denoiser for the ORIGINAL process c, indexed by the timestep it is fed
  (tests/oracles.py; finite at alpha-bar = 0, zero terminal SNR)."""
  return oracles.gaussian_denoise_fn(oracles.table_alpha_sigma(c.alphas_cumprod), MU, S,
                                     mean_type)


def assert_gaussian_stats(x, mean, std, what, n_se=5.0):
  """Sample mean/std of x agree with N(mean, std^2) within n_se standard errors."""
  x = np.asarray(x, np.float64).reshape(-1)
  n = x.size
  m, sd = x.mean(), x.std()
  assert abs(m - mean) <= n_se * std / math.sqrt(n), (what, m, mean, std)
  assert abs(sd / std - 1) <= n_se / math.sqrt(2 * n), (what, sd, std)


def assert_reproduces_data(x, rel, what):
  x = np.asarray(x, np.float64).reshape(-1)
  assert abs(x.mean() - MU) <= rel * S, (what, x.mean())
  assert abs(x.std() / S - 1) <= rel, (what, x.std())


# ----------------------------------------------------------------------------------------------
# space_timesteps / respace.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps,num_steps", [(1000, 50), (1000, 1000), (1000, 7),
                                                     (10, 3), (4000, 250), (1000, 2), (100, 99)])
def test_space_timesteps(num_timesteps, num_steps):
  ts = np.asarray(samplers.space_timesteps(num_timesteps, num_steps))
  assert ts.shape == (num_steps,)
  assert np.issubdtype(ts.dtype, np.integer)
  assert np.all(np.diff(ts) > 0)                         # sorted, distinct
  assert ts[0] == 0 and ts[-1] == num_timesteps - 1      # both ends (docstring)
  gaps = np.diff(ts)
  assert gaps.max() - gaps.min() <= 1                    # evenly spaced up to rounding
  assert np.all(np.abs(ts - np.linspace(0, num_timesteps - 1, num_steps)) <= 1.0)


def test_space_timesteps_one_step():
  np.testing.assert_array_equal(samplers.space_timesteps(1000, 1), [999])


def test_respace(rng):
  d, c = linear_process()
  k = int(rng.integers(5, 200))
  use = np.sort(rng.choice(T, size=k, replace=False))
  rd = samplers.respace(d, use)
  ab = c.alphas_cumprod[use]
  betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
  rc = ref.Coefs(betas)
  assert rd.num_timesteps == k
  np.testing.assert_array_equal(np.asarray(rd.timestep_map), use)
  # The marginals q(x_tau | x0) are unchanged.
  np.testing.assert_allclose(rd.alphas_cumprod, ab, rtol=1e-6)
  for field in ("betas", "alphas_cumprod_prev", "sqrt_one_minus_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                "posterior_mean_coef2", "log_one_minus_alphas_cumprod"):
    np.testing.assert_allclose(np.asarray(getattr(rd, field)), getattr(rc, field), rtol=1e-5,
                               atol=1e-30, err_msg=field)
  # Respacing onto every step is the identity.
  full = samplers.respace(d, np.arange(T))
  np.testing.assert_allclose(full.betas, d.betas, rtol=1e-5)


def test_public_names_at_package_level():
  for name in ("p_sample_loop", "p_sample_loop_progressive", "space_timesteps", "respace",
               "ddim_sample_loop", "ddim_reverse_sample_loop"):
    assert getattr(diffusion_jax, name) is getattr(samplers, name), name


# ----------------------------------------------------------------------------------------------
# Ancestral sampling.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_ancestral_sampler_reproduces_gaussian_data(rng, var_type):
  d, c = linear_process()
  fn = jax.jit(functools.partial(samplers.p_sample_loop, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, mean_type="eps", var_type=var_type,
                                 clip_denoised=False))
  x = jax.device_get(fn(d, rng=jax_key(rng)))
  assert x.shape == SAMPLE_SHAPE
  assert_reproduces_data(x, 0.02, var_type)
  m, v, _ = ref.oracle_affine_ancestral(c, MU, S, var_type)
  assert_gaussian_stats(x, m, math.sqrt(v), var_type)


@pytest.mark.slow
@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_respaced_ancestral_sampler(rng, var_type):
  """50 of 1000 steps: the law of the output is the exact composition on the respaced process
  (the oracle is fed d.timestep_map[i]; fed i instead, it would be far off)."""
  d, c = linear_process()
  use = samplers.space_timesteps(T, 50)
  rd = samplers.respace(d, use)
  ab = c.alphas_cumprod[np.asarray(use)]
  rc = ref.Coefs(1 - ab / np.concatenate([[1.0], ab[:-1]]))
  fn = jax.jit(functools.partial(samplers.p_sample_loop, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, mean_type="eps", var_type=var_type,
                                 clip_denoised=False))
  x = jax.device_get(fn(rd, rng=jax_key(rng)))
  m, v, _ = ref.oracle_affine_ancestral(rc, MU, S, var_type)
  assert_gaussian_stats(x, m, math.sqrt(v), f"respaced {var_type}")


@pytest.mark.slow
def test_progressive_chain_and_single_steps(rng):
  """chain[k] is x_t fed to the model at save_timesteps[k]; each step is N(mu_theta, var_t)."""
  d, c = linear_process()
  var_type = "fixedlarge"
  save = [999, 500, 1, 0]
  fn = jax.jit(functools.partial(samplers.p_sample_loop_progressive, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, mean_type="eps", var_type=var_type,
                                 clip_denoised=False, save_timesteps=save))
  key = jax_key(rng)
  x0, chain, pred = jax.device_get(fn(d, rng=key))
  assert chain.shape == (len(save),) + SAMPLE_SHAPE and pred.shape == chain.shape
  # Same rng, same x0 as p_sample_loop (up to float32 rounding: two different XLA programs).
  plain = jax.jit(functools.partial(samplers.p_sample_loop, denoise_fn=oracle(c),
                                    shape=SAMPLE_SHAPE, mean_type="eps", var_type=var_type,
                                    clip_denoised=False))(d, rng=key)
  np.testing.assert_allclose(x0, np.asarray(plain), rtol=1e-5, atol=2e-5)

  _, _, before = ref.oracle_affine_ancestral(c, MU, S, var_type)
  chain64 = chain.astype(np.float64)
  for k, t in enumerate(save):
    m, v = before[t]
    assert_gaussian_stats(chain64[k], m, math.sqrt(v), f"chain at t={t}")
    # pred_xstart = E[x0 | x_t] = (x - sigma eps_hat) / a, exactly (no clipping).
    ab = c.alphas_cumprod[t]
    a, sig = math.sqrt(ab), math.sqrt(1 - ab)
    eps = ref.oracle_eps_gain(ab, S) * (chain64[k] - a * MU)
    want = (chain64[k] - sig * eps) / a
    np.testing.assert_allclose(pred[k], want, rtol=1e-4, atol=1e-4 / a, err_msg=f"t={t}")

  # The step t=1 -> t=0 adds noise of variance var_1; the step t=0 -> x0 adds none.
  def mu_theta(x, t):
    p = ref.p_mean_variance(c, ref.oracle_eps_gain(c.alphas_cumprod[t], S) *
                            (x - c.sqrt_alphas_cumprod[t] * MU),
                            x, np.full(x.shape[0], t), "eps", var_type, clip=False)
    return p["mean"], p["variance"]
  mean1, var1 = mu_theta(chain64[2], 1)
  z = (chain64[3] - mean1) / np.sqrt(var1)
  assert_gaussian_stats(z, 0.0, 1.0, "standardised step t=1")
  mean0, _ = mu_theta(chain64[3], 0)
  np.testing.assert_allclose(x0, mean0, rtol=1e-5, atol=1e-5)


def test_p_sample_single_step(rng):
  d, c = linear_process()
  shape = (4096, 4, 1, 1)
  x = rng.normal(size=shape).astype(np.float32)
  f = jax.jit(functools.partial(samplers.p_sample, denoise_fn=oracle(c), mean_type="eps",
                                var_type="fixedsmall", clip_denoised=False))
  for t in (0, 1, 700):
    tt = jnp.full((shape[0],), t, jnp.int32)
    x_prev, pred = jax.device_get(f(d, x_t=x, t=tt, rng=jax_key(rng)))
    x64 = x.astype(np.float64)
    p = ref.p_mean_variance(c, ref.oracle_eps_gain(c.alphas_cumprod[t], S) *
                            (x64 - c.sqrt_alphas_cumprod[t] * MU),
                            x64, np.full(shape[0], t), "eps", "fixedsmall", clip=False)
    np.testing.assert_allclose(pred, p["pred_xstart"], rtol=1e-4, atol=1e-4 * (1 + 1 / math.sqrt(
        c.alphas_cumprod[t])))
    if t == 0:
      np.testing.assert_allclose(x_prev, p["mean"], rtol=1e-5, atol=1e-5)
    else:
      assert_gaussian_stats((x_prev - p["mean"]) / np.sqrt(p["variance"]), 0.0, 1.0, f"t={t}")


# ----------------------------------------------------------------------------------------------
# DDIM.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddim_all_steps_reproduces_gaussian_data(rng):
  d, c = linear_process()
  fn = jax.jit(functools.partial(samplers.ddim_sample_loop, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, num_steps=T, eta=0.0, mean_type="eps",
                                 clip_denoised=False))
  x = jax.device_get(fn(d, rng=jax_key(rng)))
  assert x.shape == SAMPLE_SHAPE
  assert_reproduces_data(x, 0.02, "ddim T steps")
  m, v = ref.oracle_affine_ddim(c.alphas_cumprod, MU, S, 0.0)
  assert_gaussian_stats(x, m, math.sqrt(v), "ddim T steps")


@pytest.mark.slow
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_matches_exact_composition(rng, eta):
  """With 50 steps the std is intrinsically ~5% low (eta=0); the composed maps predict it."""
  d, c = linear_process()
  use = np.asarray(samplers.space_timesteps(T, 50))
  fn = jax.jit(functools.partial(samplers.ddim_sample_loop, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, num_steps=50, eta=eta, mean_type="eps",
                                 clip_denoised=False))
  x = np.asarray(jax.device_get(fn(d, rng=jax_key(rng))), np.float64)
  m, v = ref.oracle_affine_ddim(c.alphas_cumprod[use], MU, S, eta)
  assert abs(x.std() / math.sqrt(v) - 1) <= 0.015, (x.std(), math.sqrt(v))
  assert abs(x.mean() - m) <= 0.015 * S, (x.mean(), m)
  assert_gaussian_stats(x, m, math.sqrt(v), f"ddim 50 eta={eta}")
  if eta == 0.0:
    assert math.sqrt(v) < 0.97 * S  # the test can see the discretisation error


def ddim_affine_decode(abar_seq, mu, s):
  """x_out = A x_init + B for DDIM eta=0 over abar_seq (ascending), float64."""
  A, B = 1.0, 0.0
  for i in range(len(abar_seq) - 1, -1, -1):
    ab = abar_seq[i]
    ab_p = abar_seq[i - 1] if i > 0 else 1.0
    a = math.sqrt(ab)
    k = ref.oracle_eps_gain(ab, s)
    g0, h0 = ref.oracle_x0_affine(ab, mu, s)     # x0_hat = g0 x + h0
    ge, he = k, -k * a * mu                      # eps_hat = ge x + he
    g = math.sqrt(ab_p) * g0 + math.sqrt(1 - ab_p) * ge
    h = math.sqrt(ab_p) * h0 + math.sqrt(1 - ab_p) * he
    A, B = g * A, g * B + h
  return A, B


def ddim_affine_encode(abar_all, use, mu, s):
  """The encoder of the docstring: step i goes abar_prev -> abar[use[i]] with eps_hat at the
  current state and timestep use[max(i-1, 0)]; abar_prev starts at 1."""
  A, B = 1.0, 0.0
  ab_prev = 1.0
  for i in range(len(use)):
    ab_eval = abar_all[use[max(i - 1, 0)]]
    k = ref.oracle_eps_gain(ab_eval, s)
    ge, he = k, -k * math.sqrt(ab_eval) * mu
    g0 = (1 - math.sqrt(1 - ab_prev) * ge) / math.sqrt(ab_prev)
    h0 = -math.sqrt(1 - ab_prev) * he / math.sqrt(ab_prev)
    ab_n = abar_all[use[i]]
    g = math.sqrt(ab_n) * g0 + math.sqrt(1 - ab_n) * ge
    h = math.sqrt(ab_n) * h0 + math.sqrt(1 - ab_n) * he
    A, B = g * A, g * B + h
    ab_prev = ab_n
  return A, B


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _ddim_deterministic(d, x_init, x_start, num_steps):
  c = linear_process()[1]
  outs = {}
  for m in ("eps", "v", "xstart"):
    outs[("decode", m)] = samplers.ddim_sample_loop(
        d, oracle(c, m), x_init.shape, jax.random.key(0), num_steps=num_steps, eta=0.0,
        mean_type=m, clip_denoised=False, x_init=x_init)
    outs[("encode", m)] = samplers.ddim_reverse_sample_loop(
        d, oracle(c, m), x_start, num_steps=num_steps, mean_type=m, clip_denoised=False)
  return outs


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_decode_and_encode_elementwise(rng, num_steps):
  """Deterministic paths: every element equals the float64 composed affine map, for eps, v and
  xstart parametrisations of the same exact denoiser."""
  d, c = linear_process()
  use = np.asarray(samplers.space_timesteps(T, num_steps))
  shape = (64, 4, 4, 1)
  x_init = rng.normal(size=shape).astype(np.float32)
  x_start = (MU + S * rng.normal(size=shape)).astype(np.float32)
  outs = jax.device_get(_ddim_deterministic(d, x_init, x_start, num_steps=num_steps))
  A, B = ddim_affine_decode(c.alphas_cumprod[use], MU, S)
  Ae, Be = ddim_affine_encode(c.alphas_cumprod, use, MU, S)
  want_dec = A * x_init.astype(np.float64) + B
  want_enc = Ae * x_start.astype(np.float64) + Be
  for m in ("eps", "v", "xstart"):
    np.testing.assert_allclose(outs[("decode", m)], want_dec, rtol=2e-4, atol=2e-4,
                               err_msg=f"decode {m}")
    np.testing.assert_allclose(outs[("encode", m)], want_enc, rtol=2e-4, atol=2e-4,
                               err_msg=f"encode {m}")


@functools.lru_cache(maxsize=None)
def zero_terminal_snr_process():
  betas = ref.zero_terminal_snr(ref.beta_schedule("linear", T))
  return gd.GaussianDiffusion.from_betas(betas), ref.Coefs(betas)


@pytest.mark.parametrize("mean_type", ["v", "xstart"])
def test_ddim_zero_terminal_snr(rng, mean_type):
  """Lin et al. 2024: with alpha-bar_T = 0 sampling starts at pure noise, where x0_hat = E[x0]
  and eps_hat = x_T are finite for v / x0 prediction; DDIM must stay finite and exact."""
  d, c = zero_terminal_snr_process()
  assert c.alphas_cumprod[-1] == 0.0
  use = np.asarray(samplers.space_timesteps(T, 20))
  shape = (256, 2, 2, 1)
  x_init = rng.normal(size=shape).astype(np.float32)
  fn = jax.jit(functools.partial(samplers.ddim_sample_loop, denoise_fn=oracle(c, mean_type),
                                 shape=shape, num_steps=20, eta=0.0, mean_type=mean_type,
                                 clip_denoised=False))
  x = np.asarray(fn(d, rng=jax_key(rng), x_init=x_init))
  assert np.all(np.isfinite(x)), f"{np.isnan(x).mean():.0%} NaN"
  A, B = ddim_affine_decode(c.alphas_cumprod[use], MU, S)
  np.testing.assert_allclose(x, A * x_init.astype(np.float64) + B, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_ancestral_zero_terminal_snr_v_prediction(rng):
  """Respaced ancestral sampling on a zero-terminal-SNR process with v prediction."""
  d, c = zero_terminal_snr_process()
  use = samplers.space_timesteps(T, 50)
  rd = samplers.respace(d, use)
  ab = c.alphas_cumprod[np.asarray(use)]
  rc = ref.Coefs(1 - ab / np.concatenate([[1.0], ab[:-1]]))
  assert rc.betas[-1] == 1.0
  fn = jax.jit(functools.partial(samplers.p_sample_loop, denoise_fn=oracle(c, "v"),
                                 shape=SAMPLE_SHAPE, mean_type="v", var_type="fixedsmall",
                                 clip_denoised=False))
  x = jax.device_get(fn(rd, rng=jax_key(rng)))
  assert np.all(np.isfinite(x))
  m, v, _ = ref.oracle_affine_ancestral(rc, MU, S, "fixedsmall")
  assert_gaussian_stats(x, m, math.sqrt(v), "zero terminal SNR, v")


@pytest.mark.slow
def test_ddim_eta_one_all_steps_is_ancestral_fixedsmall(rng):
  """sigma_t(eta=1) over all steps equals beta-tilde_t: the law of DDPM with fixedsmall."""
  d, c = linear_process()
  ab = c.alphas_cumprod
  ab_prev = c.alphas_cumprod_prev
  sigma2 = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
  np.testing.assert_allclose(sigma2, c.posterior_variance, rtol=1e-9, atol=1e-300)
  m_d, v_d = ref.oracle_affine_ddim(ab, MU, S, 1.0)
  m_a, v_a, _ = ref.oracle_affine_ancestral(c, MU, S, "fixedsmall")
  assert m_d == pytest.approx(m_a, rel=1e-9) and v_d == pytest.approx(v_a, rel=1e-9)
  fn = jax.jit(functools.partial(samplers.ddim_sample_loop, denoise_fn=oracle(c),
                                 shape=SAMPLE_SHAPE, num_steps=T, eta=1.0, mean_type="eps",
                                 clip_denoised=False))
  x = jax.device_get(fn(d, rng=jax_key(rng)))
  assert_gaussian_stats(x, m_a, math.sqrt(v_a), "ddim eta=1")


def test_clip_denoised_keeps_samples_in_range(rng):
  d, c = linear_process()
  fn = jax.jit(functools.partial(samplers.ddim_sample_loop, denoise_fn=oracle(c),
                                 shape=(256, 2, 2, 1), num_steps=20, eta=0.0, mean_type="eps",
                                 clip_denoised=True))
  x = np.asarray(fn(d, rng=jax_key(rng)))
  assert np.all(np.abs(x) <= 1.0 + 1e-6)   # the last step returns the clipped x0_hat


def test_sampler_strings_validated():
  d, c = linear_process()
  with pytest.raises(ValueError) as e:
    samplers.p_sample_loop(d, oracle(c), (2, 1), jax.random.key(0), mean_type="noise",
                           var_type="fixedsmall")
  assert "eps" in str(e.value) and "xstart" in str(e.value)
  with pytest.raises(ValueError) as e:
    samplers.p_sample_loop(d, oracle(c), (2, 1), jax.random.key(0), mean_type="eps",
                           var_type="small")
  assert "fixedsmall" in str(e.value) and "learned_range" in str(e.value)
  with pytest.raises(ValueError) as e:
    samplers.ddim_sample_loop(d, oracle(c), (2, 1), jax.random.key(0), num_steps=5,
                              mean_type="epsilon")
  assert "eps" in str(e.value) and "xstart" in str(e.value)
