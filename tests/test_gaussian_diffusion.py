"""The forward process, posterior, model distribution, losses and bits/dim of
`diffusion_jax.process.gaussian_diffusion`, each against a float64 NumPy re-derivation
(tests/numpy_reference.py) on fresh random inputs.

Every jitted function is compiled once per static configuration; the schedules are looped over
inside a test (a `GaussianDiffusion` is a pytree argument, so a new schedule of the same length
does not retrace).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import diffusion_jax
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.training import timestep_sampler as ts

try:
  from tests import numpy_reference as ref
  from tests import oracles
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import numpy_reference as ref
  import oracles

T = 1000
# (schedule, zero_terminal_snr): every schedule, and two rescaled to zero terminal SNR.
SCHEDULES = [(n, False) for n in ("linear", "quad", "const", "jsd", "warmup10", "warmup50",
                                  "cosine", "sigmoid")] + [("linear", True), ("cosine", True)]
MEAN_TYPES = ref.MEAN_TYPES
VAR_TYPES = ref.VAR_TYPES
LEARNED = ("learned", "learned_range")


def ref_betas(name, zts, num_timesteps=T):
  b = ref.beta_schedule(name, num_timesteps)
  return ref.zero_terminal_snr(b) if zts else b


@functools.lru_cache(maxsize=None)
def diffusion_and_coefs(name, zts, num_timesteps=T):
  betas = ref_betas(name, zts, num_timesteps)
  return gd.GaussianDiffusion.from_betas(betas), ref.Coefs(betas)


def assert_close(got, want, scale, rtol, atol=0.0, what=""):
  """|got - want| <= rtol * scale + atol elementwise, where scale bounds the float32 rounding."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.abs(got - want)
  tol = rtol * np.asarray(scale, np.float64) + atol
  bad = ~(err <= tol)
  if bad.any():
    i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
    raise AssertionError(f"{what}: {bad.sum()}/{bad.size} elements off; worst at {i}: "
                         f"got {got[i]!r}, want {want[i]!r}, tol {tol[i]!r}")


def random_t(rng, c, n, avoid_zero_abar=False):
  """n timesteps covering both ends, optionally skipping alpha-bar_t == 0."""
  hi = c.T - 1 if (avoid_zero_abar and c.alphas_cumprod[-1] == 0) else c.T
  t = rng.integers(0, hi, size=n)
  t[0], t[1] = 0, hi - 1
  if n > 2:
    t[2] = 1
  return t.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The GaussianDiffusion coefficients.
# ----------------------------------------------------------------------------------------------

FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
          "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


@pytest.mark.parametrize("name,zts", SCHEDULES)
def test_from_betas_fields(name, zts):
  d, c = diffusion_and_coefs(name, zts)
  assert d.num_timesteps == T
  np.testing.assert_array_equal(np.asarray(d.timestep_map), np.arange(T))
  assert d.timestep_map.dtype == jnp.int32
  for field in FIELDS:
    got = np.asarray(getattr(d, field))
    want = getattr(c, field)
    assert got.dtype == np.float32, field
    assert got.shape == (T,), field
    finite = np.isfinite(want)
    # Stored float32 of a float64 computation: a few ulps.
    assert_close(got[finite], want[finite], np.abs(want[finite]), rtol=1e-6, atol=1e-30,
                 what=field)
    # 1/sqrt(alpha-bar) where alpha-bar_T = 0 (jsd, zero terminal SNR): must not be finite-small.
    assert np.all(~np.isfinite(got[~finite]) | (np.abs(got[~finite]) > 1e6)), field


def test_from_betas_golden_posterior_variance():
  d = gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, 1000))
  assert abs(float(d.posterior_variance[487]) - 0.00979) <= 0.5e-5
  assert abs(float(d.posterior_variance[999]) - 0.02) <= 0.5e-4
  d = gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, 500))
  assert abs(float(d.sqrt_alphas_cumprod[-1]) - 0.0797) <= 0.5e-4
  assert abs(1.0 - float(d.alphas_cumprod[-1]) - 0.99365) <= 0.5e-5


@pytest.mark.parametrize("betas", [
    np.full((4, 2), 0.01),            # not 1-D
    np.array([0.01, 0.0, 0.02]),      # 0 is outside (0, 1]
    np.array([0.01, -0.1, 0.02]),
    np.array([0.01, 1.5]),
    np.array([0.01, np.nan]),
])
def test_from_betas_rejects_invalid(betas):
  with pytest.raises(ValueError):
    gd.GaussianDiffusion.from_betas(betas)


def test_from_betas_accepts_terminal_one():
  d = gd.GaussianDiffusion.from_betas(np.array([0.1, 0.5, 1.0]))
  assert float(d.alphas_cumprod[-1]) == 0.0


def test_public_names_at_package_level():
  for name in ("GaussianDiffusion", "q_mean_variance", "q_sample", "q_posterior_mean_variance",
               "predict_start_from_noise", "p_mean_variance", "normal_kl",
               "discretized_gaussian_log_likelihood", "mean_flat", "training_losses",
               "calc_bpd_loop"):
    assert getattr(diffusion_jax, name) is getattr(gd, name), name


# ----------------------------------------------------------------------------------------------
# Forward process and posterior (every schedule, one compile).
# ----------------------------------------------------------------------------------------------


@jax.jit
def _forward_fns(d, x0, xt, t, noise):
  return dict(q_mv=gd.q_mean_variance(d, x0, t),
              q_sample=gd.q_sample(d, x0, t, noise),
              posterior=gd.q_posterior_mean_variance(d, x0, xt, t),
              x0_from_eps=gd.predict_start_from_noise(d, xt, t, noise))


def _forward_inputs(rng, c, shape):
  t = random_t(rng, c, shape[0], avoid_zero_abar=True)
  # Inputs rounded to float32 first: the reference sees exactly what the library sees.
  x0 = rng.uniform(-1, 1, shape).astype(np.float32).astype(np.float64)
  xt = (rng.normal(size=shape) * 1.5).astype(np.float32).astype(np.float64)
  noise = rng.normal(size=shape).astype(np.float32).astype(np.float64)
  return t, x0, xt, noise


def test_q_mean_variance_every_schedule(rng):
  shape = (8, 4, 4, 3)
  n = len(shape)
  for name, zts in SCHEDULES:
    d, c = diffusion_and_coefs(name, zts)
    what = f"{name}{' zts' if zts else ''}"
    t, x0, xt, noise = _forward_inputs(rng, c, shape)
    mean, var, logvar = jax.device_get(_forward_fns(d, x0, xt, jnp.asarray(t), noise)["q_mv"])
    a = ref.bcast(c.sqrt_alphas_cumprod, t, n)
    var_want = np.broadcast_to(ref.bcast(c.one_minus_alphas_cumprod, t, n), shape)
    assert_close(mean, a * x0, np.abs(a * x0), 1e-6, 1e-7, f"q mean {what}")
    assert_close(logvar, np.log(var_want), np.abs(np.log(var_want)), 1e-6, 0, f"q logvar {what}")
    # 1 - alpha-bar_t is ~beta_0 = 1e-4 at t = 0: float32 storage allows ~1e-7 relative error,
    # which 1 - float32(alpha-bar) (error ~6e-8 absolute, ~6e-4 relative) does not meet.
    assert_close(var, var_want, var_want, 1e-6, 0, f"q var {what}")


def test_q_sample_posterior_predict_every_schedule(rng):
  shape = (8, 4, 4, 3)
  n = len(shape)
  for name, zts in SCHEDULES:
    d, c = diffusion_and_coefs(name, zts)
    what = f"{name}{' zts' if zts else ''}"
    t, x0, xt, noise = _forward_inputs(rng, c, shape)
    out = jax.device_get(_forward_fns(d, x0, xt, jnp.asarray(t), noise))
    a = ref.bcast(c.sqrt_alphas_cumprod, t, n)
    sig = ref.bcast(c.sqrt_one_minus_alphas_cumprod, t, n)

    want = ref.q_sample(c, x0, t, noise)
    assert_close(out["q_sample"], want, np.abs(a * x0) + np.abs(sig * noise), 1e-6, 1e-7,
                 f"q_sample {what}")

    pm, pv, plv = ref.q_posterior(c, x0, xt, t)
    c1 = ref.bcast(c.posterior_mean_coef1, t, n)
    c2 = ref.bcast(c.posterior_mean_coef2, t, n)
    assert_close(out["posterior"][0], pm, np.abs(c1 * x0) + np.abs(c2 * xt), 1e-6, 1e-7,
                 f"posterior mean {what}")
    assert_close(out["posterior"][1], pv, pv, 1e-6, 0, f"posterior var {what}")
    assert_close(out["posterior"][2], plv, np.abs(plv), 1e-6, 0, f"posterior logvar {what}")

    want = ref.x0_from_eps(c, xt, t, noise)
    assert_close(out["x0_from_eps"], want, (np.abs(xt) + np.abs(sig * noise)) / a, 1e-6, 1e-7,
                 f"predict_start_from_noise {what}")


def test_posterior_is_the_bayes_posterior(rng):
  """Independent of eq. 7: q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), by squares."""
  d, c = diffusion_and_coefs("cosine", False)
  shape = (16, 3)
  t = random_t(rng, c, shape[0])
  t = np.maximum(t, 1)
  x0 = rng.uniform(-1, 1, shape)
  xt = rng.normal(size=shape)
  b = c.betas[t][:, None]
  abp = c.alphas_cumprod_prev[t][:, None]
  # Precision-weighted combination of N(x_t/sqrt(alpha), beta/alpha) and N(sqrt(abp) x0, 1-abp).
  prec = (1 - b) / b + 1.0 / (1 - abp)
  mean = ((np.sqrt(1 - b) / b) * xt + np.sqrt(abp) / (1 - abp) * x0) / prec
  got_mean, got_var, _ = jax.device_get(jax.jit(gd.q_posterior_mean_variance)(
      d, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t)))
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_var, np.broadcast_to(1 / prec, shape), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# p_mean_variance: every mean type x variance type x clip, every schedule.
# ----------------------------------------------------------------------------------------------


def model_output_for(rng, c, xt, t, mean_type, var_type):
  shape = xt.shape
  n = xt.ndim
  if mean_type in ("eps", "v"):
    out = rng.normal(size=shape) * 1.5
  elif mean_type == "xstart":
    out = rng.uniform(-1.5, 1.5, shape)
  else:  # xprev: a posterior mean whose implied x0 straddles [-1, 1]
    out = (ref.bcast(c.posterior_mean_coef1, t, n) * rng.uniform(-1.5, 1.5, shape)
           + ref.bcast(c.posterior_mean_coef2, t, n) * xt)
  if var_type == "learned":
    out = np.concatenate([out, rng.normal(size=shape) * 2 - 6], axis=-1)
  elif var_type == "learned_range":
    # Outside [-1, 1] too: the interpolation fraction is not clipped.
    out = np.concatenate([out, rng.uniform(-1.3, 1.3, shape)], axis=-1)
  return out


@functools.partial(jax.jit, static_argnames=("var_type",))
def _p_mean_variance_all(d, outs, xt, t, var_type):
  """Every mean type (outs[mean_type]) x clip for one var_type: one compile per var_type."""
  return {(m, clip): gd.p_mean_variance(d, outs[m], xt, t, mean_type=m, var_type=var_type,
                                        clip_denoised=clip)
          for m in MEAN_TYPES for clip in (True, False)}


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_p_mean_variance(rng, var_type):
  """Every schedule x mean type x clip for this var_type, against the float64 formulas."""
  shape = (8, 3, 3, 2)
  for name, zts in SCHEDULES:
    d, c = diffusion_and_coefs(name, zts)
    # eps cannot be inverted where alpha-bar_t = 0, so all types share t avoiding it; the
    # alpha-bar_T = 0 step is covered for v / xstart / xprev just below.
    for avoid in (True, False):
      t = random_t(rng, c, shape[0], avoid_zero_abar=avoid)
      xt = (rng.normal(size=shape) * 1.5).astype(np.float32).astype(np.float64)
      outs = {m: model_output_for(rng, c, xt, t, m, var_type).astype(np.float32).astype(np.float64)
              for m in MEAN_TYPES}
      got = jax.device_get(_p_mean_variance_all(d, outs, xt, jnp.asarray(t), var_type=var_type))
      for (mean_type, clip), g in got.items():
        if not avoid and mean_type == "eps":
          continue
        what = f"{mean_type}/{var_type}/clip={clip} {name}{' zts' if zts else ''} t={t}"
        _check_p_mean_variance(g, c, outs[mean_type], xt, t, mean_type, var_type, clip, what)


def _check_p_mean_variance(got, c, out, xt, t, mean_type, var_type, clip, what):
  want = ref.p_mean_variance(c, out, xt, t, mean_type, var_type, clip)
  for k in ("mean", "variance", "log_variance", "pred_xstart"):
    assert np.shape(got[k]) == xt.shape, (what, k, np.shape(got[k]))
  assert_close(got["pred_xstart"], want["pred_xstart"], want["scale_pred_xstart"], 1e-5, 1e-6,
               f"pred_xstart {what}")
  assert_close(got["mean"], want["mean"], want["scale_mean"], 1e-5, 1e-6, f"mean {what}")
  assert_close(got["log_variance"], want["log_variance"], want["scale_log_variance"], 1e-6,
               1e-6, f"log_variance {what}")
  want_var = np.array(want["variance"])
  if var_type == "fixedsmall":
    # Ambiguous at t = 0: the DDPM code returns the unclipped beta-tilde_0 = 0 there, a
    # variance consistent with the clipped log variance is beta-tilde_1. Accept either.
    at0 = np.broadcast_to((t == 0).reshape((-1,) + (1,) * (xt.ndim - 1)), xt.shape)
    use_clipped = at0 & (np.asarray(got["variance"]) != 0)
    want_var[use_clipped] = c.posterior_variance[1]
  assert_close(got["variance"], want_var,
               want_var * (1e-6 * want["scale_log_variance"] + 1e-6), 1.0, 0,
               f"variance {what}")
  if clip and mean_type != "xprev":
    assert np.all(np.abs(got["pred_xstart"]) <= 1.0), what


def test_p_mean_variance_learned_range_endpoints(rng):
  """v = -1 gives the fixed-small log variance, v = +1 gives log beta (Nichol & Dhariwal eq. 15)."""
  d, c = diffusion_and_coefs("linear", False)
  fn = jax.jit(functools.partial(gd.p_mean_variance, mean_type="eps", var_type="learned_range"))
  shape = (6, 2, 2, 1)
  t = random_t(rng, c, shape[0])
  xt = rng.normal(size=shape).astype(np.float32)
  for v, want in ((-1.0, c.posterior_log_variance_clipped), (1.0, np.log(c.betas))):
    out = np.concatenate([np.zeros(shape), np.full(shape, v)], -1).astype(np.float32)
    got = fn(d, out, xt, jnp.asarray(t))["log_variance"]
    np.testing.assert_allclose(np.asarray(got)[:, 0, 0, 0], want[t], rtol=1e-6)


def test_fixedlarge_variance_values():
  d, c = diffusion_and_coefs("linear", False)
  t = np.array([0, 1, 2, 500, 999], np.int32)
  xt = np.zeros((5, 1), np.float32)
  got = jax.device_get(gd.p_mean_variance(d, xt, xt, jnp.asarray(t), mean_type="eps",
                                          var_type="fixedlarge"))
  want = np.concatenate([[c.posterior_variance[1]], c.betas[1:]])[t]
  np.testing.assert_allclose(got["variance"][:, 0], want, rtol=1e-6)
  np.testing.assert_allclose(got["log_variance"][:, 0], np.log(want), rtol=1e-6)
  # Index 0 is beta-tilde_1, not beta_0; the rest are beta_t.
  assert got["variance"][0, 0] != pytest.approx(c.betas[0], rel=1e-3)


def test_p_mean_variance_is_exact_for_the_true_x0(rng):
  """Feeding the exact eps / x0 / v / mu-tilde gives back mu-tilde and x0 (the types agree)."""
  d, c = diffusion_and_coefs("cosine", False)
  shape = (8, 2, 2, 3)
  t = random_t(rng, c, shape[0], avoid_zero_abar=True)
  x0 = rng.uniform(-1, 1, shape)
  noise = rng.normal(size=shape)
  xt = ref.q_sample(c, x0, t, noise).astype(np.float32).astype(np.float64)
  noise = ref.eps_from_x0(c, xt, t, x0)  # exact for the rounded x_t
  mu = ref.q_posterior(c, x0, xt, t)[0]
  targets = {"eps": noise, "xstart": x0, "v": ref.q_v(c, x0, t, noise), "xprev": mu}
  for mean_type, out in targets.items():
    got = gd.p_mean_variance(d, jnp.asarray(out, jnp.float32), jnp.asarray(xt, jnp.float32),
                             jnp.asarray(t), mean_type=mean_type, var_type="fixedsmall",
                             clip_denoised=False)
    want = ref.p_mean_variance(c, out, xt, t, mean_type, "fixedsmall", False)
    np.testing.assert_allclose(want["pred_xstart"], x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(want["mean"], mu, rtol=1e-9, atol=1e-9)
    assert_close(got["pred_xstart"], x0, want["scale_pred_xstart"], 1e-5, 1e-6, mean_type)
    assert_close(got["mean"], mu, want["scale_mean"], 1e-5, 1e-6, mean_type)


# ----------------------------------------------------------------------------------------------
# normal_kl, discretized Gaussian likelihood, mean_flat.
# ----------------------------------------------------------------------------------------------


def test_normal_kl(rng):
  shape = (5, 7)
  m1, m2 = rng.normal(size=shape), rng.normal(size=shape)
  lv1, lv2 = rng.normal(size=shape) * 2, rng.normal(size=shape) * 2
  got = jax.jit(gd.normal_kl)(*(jnp.asarray(v, jnp.float32) for v in (m1, lv1, m2, lv2)))
  want = ref.normal_kl(m1, lv1, m2, lv2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(got) >= -1e-6)
  # KL(p, p) = 0; and a Monte Carlo estimate E_p[log p - log q] agrees for one pair.
  np.testing.assert_allclose(gd.normal_kl(m1, lv1, m1, lv1), 0, atol=1e-6)
  x = m1[0, 0] + np.exp(0.5 * lv1[0, 0]) * rng.normal(size=400_000)
  logp = -0.5 * (lv1[0, 0] + (x - m1[0, 0]) ** 2 / np.exp(lv1[0, 0]))
  logq = -0.5 * (lv2[0, 0] + (x - m2[0, 0]) ** 2 / np.exp(lv2[0, 0]))
  diff = logp - logq
  assert abs(diff.mean() - want[0, 0]) < 6 * diff.std() / math.sqrt(diff.size) + 1e-6


def test_normal_kl_broadcasts():
  got = gd.normal_kl(jnp.zeros((3, 4)), 0.0, 1.0, jnp.zeros(()))
  np.testing.assert_allclose(got, 0.5, rtol=1e-6)


def test_discretized_gaussian_log_likelihood(rng):
  shape = (64, 4, 4, 3)
  x = rng.integers(0, 256, size=shape) / 127.5 - 1.0
  x.reshape(-1)[:64] = -1.0
  x.reshape(-1)[64:128] = 1.0
  log_scales = rng.uniform(math.log(0.003), math.log(0.5), size=shape)
  means = x + rng.normal(size=shape) * np.exp(log_scales) * 2.0
  x, means, log_scales = (v.astype(np.float32) for v in (x, means, log_scales))
  got = jax.jit(gd.discretized_gaussian_log_likelihood)(x, means=means, log_scales=log_scales)
  got = np.asarray(got, np.float64)
  x, means, log_scales = (v.astype(np.float64) for v in (x, means, log_scales))
  want = ref.discretized_gaussian_loglik(x, means, log_scales)
  assert got.shape == shape
  assert np.all(got <= 1e-6)
  # What float32 can promise: (x - mean) is rounded by ~1.2e-7 absolute, 1/sigma by ~2e-7
  # relative, the bin mass by ~1e-7 absolute and log_ndtr by ~1e-7 relative. The DDPM code's
  # tanh approximation of the normal CDF (errors up to ~2e-4) is far outside this.
  h = 1e-6
  d_mean = (ref.discretized_gaussian_loglik(x, means + h, log_scales)
            - ref.discretized_gaussian_loglik(x, means - h, log_scales)) / (2 * h)
  d_logs = (ref.discretized_gaussian_loglik(x, means, log_scales + h)
            - ref.discretized_gaussian_loglik(x, means, log_scales - h)) / (2 * h)
  tol = (2e-5 + 3e-7 / np.exp(want) + 3e-7 * np.abs(want) + 2.4e-7 * np.abs(d_mean)
         + 3e-7 * np.abs(d_logs))
  assert_close(got, want, tol, 1.0, 0.0, "log-likelihood")


def test_discretized_gaussian_impossible_bin_is_finite():
  """A bin 1000 sigma from the mean: a finite, very negative log-likelihood and gradient."""
  x = jnp.asarray([[-1.0, 0.0, 1.0]])
  means = jnp.asarray([[0.9, -0.95, -0.9]])
  log_scales = jnp.full((1, 3), math.log(1e-3))
  f = lambda m: gd.discretized_gaussian_log_likelihood(x, means=m, log_scales=log_scales)
  ll, vjp = jax.jit(lambda m: jax.vjp(f, m))(means)
  assert np.all(np.isfinite(ll)) and np.all(np.asarray(ll) < -100)
  g = vjp(jnp.ones_like(ll))[0]
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("mean_frac", [0.0, 0.9, -1.2])
def test_discretized_gaussian_bins_sum_to_one(rng, mean_frac):
  grid = np.arange(256) / 127.5 - 1.0
  mean = np.float32(mean_frac + rng.normal() * 0.05)
  log_scale = np.float32(rng.uniform(math.log(0.01), math.log(0.6)))
  got = jax.jit(gd.discretized_gaussian_log_likelihood)(
      jnp.asarray(grid, jnp.float32), means=jnp.full((256,), mean, jnp.float32),
      log_scales=jnp.full((256,), log_scale, jnp.float32))
  p = np.exp(np.asarray(got, np.float64))
  assert abs(p.sum() - 1.0) < 1e-4
  want = np.exp(ref.discretized_gaussian_loglik(grid.astype(np.float32), float(mean),
                                                float(log_scale)))
  np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-6)


def test_mean_flat(rng):
  x = rng.normal(size=(3, 4, 5, 2))
  np.testing.assert_allclose(gd.mean_flat(jnp.asarray(x)), x.reshape(3, -1).mean(1), atol=1e-6)
  assert gd.mean_flat(jnp.ones((7, 2))).shape == (7,)


# ----------------------------------------------------------------------------------------------
# training_losses against the float64 formula on the same noise.
# ----------------------------------------------------------------------------------------------


# A "perturbed oracle": the model output is the true target (test input, float64 re-derived)
# plus a smooth perturbation amp * tanh(x_t M + U[t]). Keeping the output near the truth keeps
# every decoder bin possible at t = 0, so the float64 formula applies without any floor.
MEAN_PERTURBATION = {"eps": 0.5, "v": 0.5, "xstart": 0.05, "xprev": 0.05}


def init_perturbation(rng, C, var_type, num_timesteps=T):
  cout = 2 * C if var_type in LEARNED else C
  amp = np.full(cout, 1.0)
  off = np.zeros(cout)
  if var_type == "learned":      # log variance in [-7, -3]
    amp[C:], off[C:] = 2.0, -5.0
  return {"M": rng.normal(size=(C, cout)) * 0.7, "U": rng.normal(size=(num_timesteps, cout)) * 0.5,
          "amp": amp, "off": off}


def perturbed_np(params, target, pscale, xt, t):
  C = xt.shape[-1]
  u = params["U"][t].reshape((-1,) + (1,) * (xt.ndim - 2) + (params["U"].shape[1],))
  h = params["amp"] * np.tanh(xt @ params["M"] + u) + params["off"]
  ps = pscale.reshape((-1,) + (1,) * (xt.ndim - 1))
  mean = target + ps * h[..., :C]
  return np.concatenate([mean, h[..., C:]], -1) if h.shape[-1] > C else mean


def perturbed_jax(params, target, pscale, xt, t):
  C = xt.shape[-1]
  u = params["U"][t].reshape((-1,) + (1,) * (xt.ndim - 2) + (params["U"].shape[1],))
  # HIGHEST: at the default precision a GPU rounds both operands to TF32 (10-bit mantissa), a
  # model error of ~2^-11 that is no part of the loss formula under test.
  z = jnp.matmul(xt, params["M"], precision=jax.lax.Precision.HIGHEST)
  h = params["amp"] * jnp.tanh(z + u) + params["off"]
  ps = pscale.reshape((-1,) + (1,) * (xt.ndim - 1))
  mean = target + ps * h[..., :C]
  return jnp.concatenate([mean, h[..., C:]], -1) if h.shape[-1] > C else mean


def grid_data(rng, shape):
  x = rng.integers(0, 256, size=shape) / 127.5 - 1.0
  x.reshape(-1)[:4] = -1.0
  x.reshape(-1)[4:8] = 1.0
  return x


def loss_types_for(var_type):
  return ("mse", "kl", "hybrid")


@functools.partial(jax.jit, static_argnames=("var_type", "snr_gamma"))
def _losses_all(d, params, targets, pscales, x0, t, noise, var_type, snr_gamma=None):
  """training_losses for every mean type x loss type of one var_type: one compile."""
  res = {}
  for m in MEAN_TYPES:
    fn = functools.partial(perturbed_jax, params, targets[m], pscales[m])
    for loss_type in loss_types_for(var_type):
      if snr_gamma is not None and (loss_type != "mse" or m == "xprev"):
        continue
      res[(loss_type, m)] = gd.training_losses(d, fn, x0, t, noise, loss_type=loss_type,
                                               mean_type=m, var_type=var_type,
                                               snr_gamma=snr_gamma)
  return res


def _loss_inputs(rng, c, shape):
  x0 = grid_data(rng, shape).astype(np.float32).astype(np.float64)
  t = random_t(rng, c, shape[0], avoid_zero_abar=True)
  noise = rng.normal(size=shape).astype(np.float32).astype(np.float64)
  xt = ref.q_sample(c, x0, t, noise)
  targets = {"eps": noise, "xstart": x0, "v": ref.q_v(c, x0, t, noise),
             "xprev": ref.q_posterior(c, x0, xt, t)[0]}
  targets = {k: v.astype(np.float32).astype(np.float64) for k, v in targets.items()}
  pscales = {m: MEAN_PERTURBATION[m] * (c.posterior_mean_coef1[t] if m == "xprev" else 1.0)
             * np.ones(shape[0]) for m in MEAN_TYPES}
  pscales = {k: v.astype(np.float32).astype(np.float64) for k, v in pscales.items()}
  return x0, t, noise, xt, targets, pscales


# ----------------------------------------------------------------------------------------------
# The float32 error model of training_losses, from which its tolerance is derived.
#
# A first-order running-error bound (Wilkinson): every float32 operation returns its exact
# result times (1 + δ) with |δ| ≤ U32, a transcendental (exp, log, tanh, log Φ) with
# |δ| ≤ K_TRANS·U32, and every stored float32 coefficient carries one δ of its own. The *mass*
# of a value is Σ over those operations of |∂value/∂result · result|: its float32 error is at
# most U32 · mass, up to O(U32²). The masses are evaluated per element from the float64 values
# of the reference, so each example's tolerance is its own condition number in ulps; nothing is
# a constant chosen to pass. The inputs (x₀, ε, the model's parameters) are float32 values, so
# they carry no mass; the model's own rounding and its sensitivity to the rounded x_t do.
# ----------------------------------------------------------------------------------------------

U32 = 2.0 ** -24   # float32 unit roundoff: half an ulp of 1
# exp, log, tanh and log Φ within 4 ulps: XLA's CPU and GPU float32 kernels are within 1–2 ulps
# of the correctly rounded value (CUDA's libdevice: expf 2, logf 1, tanhf 2); log Φ is a short
# chain of them.
K_TRANS = 8.0
# The bound is first order and each mass counts an operation once; a factor 2 covers the
# second-order terms and the few additions folded together below.
SAFETY = 2.0


def _sum_mass(elem, mass):
  """Mass of mean_flat(elem) [B] from elementwise masses: the inputs' plus N roundings."""
  n = np.prod(elem.shape[1:])
  return ref.mean_flat(mass) + n * ref.mean_flat(np.abs(elem))


def perturbed_mass(params, target, pscale, xt, m_xt, t):
  """Mass of `perturbed_jax`'s output (like it) at x_t rounded with mass m_xt."""
  C = xt.shape[-1]
  u = params["U"][t].reshape((-1,) + (1,) * (xt.ndim - 2) + (params["U"].shape[1],))
  absM = np.abs(params["M"])
  z = xt @ params["M"] + u
  # A length-C dot plus one add: each of its C + 1 roundings is at most U32 · Σ|terms|.
  m_z = m_xt @ absM + (C + 1) * (np.abs(xt) @ absM + np.abs(u))
  th = np.tanh(z)
  m_th = (1.0 - th * th) * m_z + K_TRANS * np.abs(th)
  h = params["amp"] * th + params["off"]
  m_h = np.abs(params["amp"]) * m_th + np.abs(params["amp"] * th) + np.abs(h)
  ps = pscale.reshape((-1,) + (1,) * (xt.ndim - 1))
  mean = target + ps * h[..., :C]
  m_mean = np.abs(ps) * m_h[..., :C] + np.abs(ps * h[..., :C]) + np.abs(mean)
  return np.concatenate([m_mean, m_h[..., C:]], -1) if h.shape[-1] > C else m_mean


def _kl_mass(m1, mm1, lv1, mlv1, m2, mm2, lv2, mlv2):
  """Mass of normal_kl(m1, lv1, m2, lv2) as the library evaluates it."""
  dm, dlv = m1 - m2, lv1 - lv2
  e, w = np.exp(dlv), np.exp(-lv2)
  q = dm * dm * w
  kl2 = np.expm1(dlv) - dlv + q                       # twice the KL
  inputs = np.abs(dm) * w * (mm1 + mm2) + 0.5 * (np.abs(e - 1.0) * mlv1
                                                 + np.abs(1.0 - e - q) * mlv2)
  # δ = lv1 − lv2, expm1(δ), − δ; m1 − m2, its square, exp(−lv2), their product; the sum.
  ops = (np.abs(e - 1.0) * np.abs(dlv) + K_TRANS * np.abs(e - 1.0) + np.abs(kl2 - q)
         + q * (4.0 + K_TRANS) + np.abs(kl2))
  return inputs + 0.5 * ops


def _decoder_mass(x, m, mm, lv, mlv):
  """Mass of discretized_gaussian_log_likelihood(x, m, 0.5 lv) as the library evaluates it."""
  ls, mls = 0.5 * lv, 0.5 * mlv
  inv = np.exp(-ls)
  m_inv = inv * (mls + K_TRANS)
  cen = x - m
  m_cen = mm + np.abs(cen)
  bins = {}
  for name, half in (("lower", -1.0 / 255.0), ("upper", 1.0 / 255.0)):
    v = (cen + half) * inv
    bins[name] = (v, inv * (m_cen + np.abs(half) + np.abs(cen + half)) + np.abs(cen + half)
                  * m_inv + np.abs(v))
  (lo, m_lo), (up, m_up) = bins["lower"], bins["upper"]
  log_pdf, log_cdf = stats.norm.logpdf, stats.norm.logcdf
  # Lowest bin: log Φ(upper). Highest: log Φ(−lower). (Every branch is evaluated everywhere,
  # so ratios of tiny densities are taken in logs.)
  low_p = log_cdf(up)
  m_low = np.exp(log_pdf(up) - low_p) * m_up + K_TRANS * np.abs(low_p)
  high_p = log_cdf(-lo)
  m_high = np.exp(log_pdf(lo) - high_p) * m_lo + K_TRANS * np.abs(high_p)
  # Middle: reflected so that a + b ≤ 0, then log Φ(b) + log1p(−Φ(a)/Φ(b)).
  flip = (lo + up) > 0
  a, b = np.where(flip, -up, lo), np.where(flip, -lo, up)
  m_a, m_b = np.where(flip, m_up, m_lo), np.where(flip, m_lo, m_up)
  log_a, log_b = log_cdf(a), log_cdf(b)
  r = np.exp(log_a - log_b)
  log_mid = log_b + np.log1p(-r)
  g = 1.0 / (1.0 - r)                                 # ∂ log_mid / ∂ log_b
  m_mid = (np.exp(log_pdf(b) - log_mid) * m_b + np.exp(log_pdf(a) - log_mid) * m_a
           + K_TRANS * (g * np.abs(log_b) + (g - 1.0) * np.abs(log_a))
           + (g - 1.0) * (np.abs(log_a - log_b) + K_TRANS) + K_TRANS * np.abs(np.log1p(-r))
           + np.abs(log_mid))
  return np.where(x < -0.999, m_low, np.where(x > 0.999, m_high, m_mid))


def training_loss_mass(c, params, target, pscale, x0, t, noise, loss_type, mean_type,
                       var_type, snr_gamma=None):
  """Mass [B] of the float32 training loss: |library − float64| ≤ SAFETY · U32 · mass."""
  n, C = x0.ndim, x0.shape[-1]

  def bc(v):
    return ref.bcast(v, t, n)

  a, s = bc(c.sqrt_alphas_cumprod), bc(c.sqrt_one_minus_alphas_cumprod)
  c1, c2 = bc(c.posterior_mean_coef1), bc(c.posterior_mean_coef2)
  # x_t = √ᾱ x₀ + √(1−ᾱ) ε: two rounded coefficients, two products, one sum.
  xt = a * x0 + s * noise
  m_xt = 2.0 * (np.abs(a * x0) + np.abs(s * noise)) + np.abs(xt)
  out = perturbed_np(params, target, pscale, xt, t)
  m_out = perturbed_mass(params, target, pscale, xt, m_xt, t)
  mo, m_mo = out[..., :C], m_out[..., :C]

  # The true posterior mean μ̃ = c1 x₀ + c2 x_t and log β̃ (a rounded table entry).
  m1 = c1 * x0 + c2 * xt
  m_m1 = 2.0 * (np.abs(c1 * x0) + np.abs(c2 * xt)) + np.abs(m1) + c2 * m_xt
  lv1 = np.broadcast_to(bc(c.posterior_log_variance_clipped), xt.shape)
  m_lv1 = np.abs(lv1)

  def mse_mass():
    if mean_type == "eps":
      tgt, m_tgt = noise, 0.0
    elif mean_type == "xstart":
      tgt, m_tgt = x0, 0.0
    elif mean_type == "v":
      tgt = a * noise - s * x0
      m_tgt = 2.0 * (np.abs(a * noise) + np.abs(s * x0)) + np.abs(tgt)
    else:
      tgt, m_tgt = m1, m_m1
    d = tgt - mo
    return (ref.mean_flat(d * d),
            _sum_mass(d * d, 2.0 * np.abs(d) * (m_tgt + m_mo + np.abs(d)) + d * d))

  def vb_mass():
    if mean_type == "xprev":
      m2, m_m2 = mo, m_mo
    else:
      if mean_type == "eps":
        sra, srm1 = bc(c.sqrt_recip_alphas_cumprod), bc(c.sqrt_recipm1_alphas_cumprod)
        x0h = sra * xt - srm1 * mo
        m_x0h = (2.0 * (np.abs(sra * xt) + np.abs(srm1 * mo)) + np.abs(x0h)
                 + sra * m_xt + srm1 * m_mo)
      elif mean_type == "xstart":
        x0h, m_x0h = mo, m_mo
      else:
        x0h = a * xt - s * mo
        m_x0h = 2.0 * (np.abs(a * xt) + np.abs(s * mo)) + np.abs(x0h) + a * m_xt + s * m_mo
      m2 = c1 * x0h + c2 * xt
      m_m2 = (2.0 * (np.abs(c1 * x0h) + np.abs(c2 * xt)) + np.abs(m2) + c1 * m_x0h
              + c2 * m_xt)
    if var_type == "fixedsmall":
      lv2, m_lv2 = lv1, m_lv1
    elif var_type == "fixedlarge":
      lv2 = np.broadcast_to(np.log(bc(c.fixedlarge_variance)), xt.shape)
      m_lv2 = 1.0 + K_TRANS * np.abs(lv2)   # log of a rounded table entry
    elif var_type == "learned":
      lv2, m_lv2 = out[..., C:], m_out[..., C:]
    else:
      v, m_v = out[..., C:], m_out[..., C:]
      lo, hi = lv1, bc(np.log(c.betas))
      m_hi = 1.0 + K_TRANS * np.abs(hi)
      frac = (v + 1.0) / 2.0
      m_frac = 0.5 * (m_v + np.abs(v + 1.0))
      lv2 = frac * hi + (1.0 - frac) * lo
      m_lv2 = (np.abs(hi) * m_frac + np.abs(frac) * m_hi + np.abs(frac * hi)
               + np.abs(lo) * (m_frac + np.abs(1.0 - frac)) + np.abs(1.0 - frac) * m_lv1
               + np.abs((1.0 - frac) * lo) + np.abs(lv2))
    kl = ref.normal_kl(m1, lv1, m2, lv2)
    logp = ref.discretized_gaussian_loglik(x0, m2, 0.5 * lv2)
    vb = np.where(t == 0, -ref.mean_flat(logp), ref.mean_flat(kl)) / ref.LOG2
    m_vb = np.where(t == 0, _sum_mass(logp, _decoder_mass(x0, m2, m_m2, lv2, m_lv2)),
                    _sum_mass(kl, _kl_mass(m1, m_m1, lv1, m_lv1, m2, m_m2, lv2, m_lv2)))
    return vb, m_vb / ref.LOG2 + np.abs(vb)

  if loss_type == "kl":
    return vb_mass()[1]
  mse, mass = mse_mass()
  if snr_gamma is not None:
    # SNR = ᾱ / (√(1−ᾱ))² from two rounded entries: 5 roundings; the weight min(SNR, γ)/SNR,
    # min(SNR, γ)/(SNR + 1) or min(SNR, γ) adds at most 7 more (γ itself rounded to float32).
    w = {"eps": 1.0 / c.snr, "v": 1.0 / (c.snr + 1.0), "xstart": 1.0}[mean_type]
    w = (np.minimum(c.snr, snr_gamma) * w)[t]
    mass = w * mass + 13.0 * np.abs(w * mse)
    mse = w * mse
  if loss_type == "hybrid" or var_type in LEARNED:
    vb, m_vb = vb_mass()
    w = c.T / 1000.0                                   # λ·T
    mass = mass + w * m_vb + np.abs(w * vb) + np.abs(mse + w * vb)
  return mass


@pytest.mark.slow
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_training_losses_exact(rng, var_type):
  """Per-example loss = the float64 formula on the same noise, every mean type and loss type."""
  shape = (8, 3, 3, 2)
  params = init_perturbation(rng, shape[-1], var_type)
  params_j = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  params = jax.tree.map(lambda v: np.asarray(v, np.float32).astype(np.float64), params)
  worst, rel = 0.0, []
  for name, zts in SCHEDULES:
    d, c = diffusion_and_coefs(name, zts)
    x0, t, noise, xt, targets, pscales = _loss_inputs(rng, c, shape)
    got = jax.device_get(_losses_all(d, params_j, targets, pscales, x0, jnp.asarray(t), noise,
                                     var_type=var_type))
    tol = {}
    for (loss_type, mean_type), g in got.items():
      out = perturbed_np(params, targets[mean_type], pscales[mean_type], xt, t)
      want = ref.training_loss(c, out, x0, t, noise, loss_type, mean_type, var_type)
      what = f"{loss_type}/{mean_type}/{var_type} {name} t={t}"
      g = np.asarray(g, np.float64)
      assert g.shape == (shape[0],), what
      assert np.all(np.isfinite(g)), what
      tol[loss_type, mean_type] = SAFETY * U32 * training_loss_mass(
          c, params, targets[mean_type], pscales[mean_type], x0, t, noise, loss_type,
          mean_type, var_type)
      assert_close(g, want, tol[loss_type, mean_type], rtol=1.0, what=what)
      worst = max(worst, float(np.max(np.abs(g - want) / tol[loss_type, mean_type])))
      rel.append(tol[loss_type, mean_type] / np.abs(want))
      if loss_type == "kl":
        assert np.all(g >= -tol["kl", mean_type]), what
    for m in MEAN_TYPES:
      if var_type not in LEARNED:
        # With a fixed variance the added bound term is a constant: it changes the value only.
        assert np.all(got["hybrid", m] >= got["mse", m] - tol["hybrid", m] - tol["mse", m]), m
  rel = np.concatenate(rel)
  print(f"largest error / tolerance {worst:.3f}; relative tolerance median {np.median(rel):.1e}, "
        f"max {rel.max():.1e}")
  assert set(got) == {(lt, m) for lt in loss_types_for(var_type) for m in MEAN_TYPES}


@pytest.mark.parametrize("var_type", ["fixedsmall", "learned_range"])
def test_training_losses_min_snr(rng, var_type):
  shape = (8, 2, 2, 3)
  gamma = round(float(rng.uniform(1.0, 8.0)), 3)
  params = init_perturbation(rng, shape[-1], var_type)
  params_j = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  params = jax.tree.map(lambda v: np.asarray(v, np.float32).astype(np.float64), params)
  d, c = diffusion_and_coefs("cosine", False)
  x0, t, noise, xt, targets, pscales = _loss_inputs(rng, c, shape)
  got = jax.device_get(_losses_all(d, params_j, targets, pscales, x0, jnp.asarray(t), noise,
                                   var_type=var_type, snr_gamma=gamma))
  assert set(got) == {("mse", m) for m in ("eps", "xstart", "v")}
  for (_, mean_type), g in got.items():
    out = perturbed_np(params, targets[mean_type], pscales[mean_type], xt, t)
    want = ref.training_loss(c, out, x0, t, noise, "mse", mean_type, var_type, snr_gamma=gamma)
    tol = SAFETY * U32 * training_loss_mass(c, params, targets[mean_type], pscales[mean_type],
                                            x0, t, noise, "mse", mean_type, var_type, gamma)
    assert_close(g, want, tol, rtol=1.0, what=f"{mean_type} gamma={gamma} t={t}")
    # The check can tell weighted from unweighted (at t = 0 the SNR is far above gamma).
    unweighted = ref.training_loss(c, out, x0, t, noise, "mse", mean_type, var_type)
    assert np.any(np.abs(want - unweighted) > 10 * tol), mean_type


def gaussian_oracle_eps(c, mu, s):
  """E[eps | x_t] for x0 iid N(mu, s^2) as a JAX denoise_fn (tests/oracles.py)."""
  return oracles.gaussian_denoise_fn(oracles.table_alpha_sigma(c.alphas_cumprod), mu, s, 'eps')


def test_training_losses_mse_expectation_for_the_gaussian_oracle(rng):
  """E ||eps - E[eps|x_t]||^2 per coordinate = Var(eps|x_t) = a^2 s^2 / (a^2 s^2 + sigma^2)."""
  mu, s = 0.3, 0.5
  d, c = diffusion_and_coefs("linear", False)
  shape = (2048, 4, 4, 1)
  fn = jax.jit(functools.partial(gd.training_losses, denoise_fn=gaussian_oracle_eps(c, mu, s),
                                 loss_type="mse", mean_type="eps", var_type="fixedsmall"))
  x0 = mu + s * rng.normal(size=shape)
  t = rng.integers(0, T, size=shape[0]).astype(np.int32)
  noise = rng.normal(size=shape)
  got = np.asarray(fn(d, x_start=jnp.asarray(x0, jnp.float32), t=jnp.asarray(t),
                      noise=jnp.asarray(noise, jnp.float32)), np.float64)
  ab = c.alphas_cumprod[t]
  expected = ab * s * s / (ab * s * s + 1 - ab)
  # Each ratio is a mean of D chi^2_1 / D variables: mean 1, variance 2 / D.
  ratio = got / expected
  D = np.prod(shape[1:])
  se = math.sqrt(2.0 / D / shape[0])
  assert abs(ratio.mean() - 1.0) < 5 * se, (ratio.mean(), se)
  # And the same value exactly, per example, on this noise.
  xt = ref.q_sample(c, x0, t, noise)
  k = ref.bcast(np.sqrt(1 - c.alphas_cumprod) / (c.alphas_cumprod * s * s + 1 - c.alphas_cumprod),
                t, 4)
  eps_hat = k * (xt - ref.bcast(c.sqrt_alphas_cumprod, t, 4) * mu)
  np.testing.assert_allclose(got, ref.mean_flat((noise - eps_hat) ** 2), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------


def linear_model(params, xt, t, learned=True):
  """Mean channels depend only on params['wm'] and params['b'][:, :C]."""
  C = xt.shape[-1]
  hp = jax.lax.Precision.HIGHEST  # exact on a GPU too, whose default is TF32
  mean = jnp.matmul(xt, params["wm"], precision=hp)
  var = jnp.matmul(xt, params["wv"], precision=hp)
  b = params["b"][t].reshape((-1,) + (1,) * (xt.ndim - 2) + (2 * C,))
  out = jnp.concatenate([mean, var], -1) + b
  return out if learned else out[..., :C]


def init_linear(rng, C):
  return {"wm": jnp.asarray(rng.normal(size=(C, C)) * 0.3, jnp.float32),
          "wv": jnp.asarray(rng.normal(size=(C, C)) * 0.3, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(T, 2 * C)) * 0.3, jnp.float32)}


GRAD_CONFIGS = (("mse", "eps", "fixedsmall"), ("mse", "v", "fixedlarge"),
                ("kl", "xstart", "fixedsmall"), ("kl", "eps", "learned"),
                ("mse", "xprev", "learned_range"))


@pytest.mark.slow
def test_gradients_flow_through_every_loss(rng):
  d, c = diffusion_and_coefs("linear", False)
  shape = (6, 3, 3, 2)
  params = init_linear(rng, shape[-1])
  x0 = jnp.asarray(grid_data(rng, shape), jnp.float32)
  t = jnp.asarray(random_t(rng, c, shape[0]))
  noise = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(p, loss_type, mean_type, var_type):
    fn = functools.partial(linear_model, p, learned=var_type in LEARNED)
    return gd.training_losses(d, fn, x0, t, noise, loss_type=loss_type, mean_type=mean_type,
                              var_type=var_type).mean()

  grads = jax.jit(lambda p: {cfg: jax.grad(loss)(p, *cfg) for cfg in GRAD_CONFIGS})(params)
  for cfg, g in grads.items():
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)), cfg
    assert float(jnp.abs(g["wm"]).sum()) > 0, cfg
    assert float(jnp.abs(g["b"][:, :shape[-1]]).sum()) > 0, cfg
    if cfg[2] in LEARNED:
      assert float(jnp.abs(g["wv"]).sum()) > 0, cfg


@pytest.mark.parametrize("var_type", ["learned_range"])
def test_hybrid_bound_term_does_not_train_the_mean(rng, var_type):
  d, c = diffusion_and_coefs("cosine", False)
  shape = (8, 3, 3, 2)
  C = shape[-1]
  params = init_linear(rng, C)
  x0 = jnp.asarray(grid_data(rng, shape), jnp.float32)
  t = jnp.asarray(random_t(rng, c, shape[0]))
  noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
  a = jnp.asarray(c.sqrt_alphas_cumprod, jnp.float32)[t][:, None, None, None]
  sig = jnp.asarray(c.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None, None]

  def losses(p):
    fn = functools.partial(linear_model, p)
    hybrid = gd.training_losses(d, fn, x0, t, noise, loss_type="hybrid", mean_type="eps",
                                var_type=var_type).mean()
    xt = a * x0 + sig * noise
    mse = jnp.mean((noise - fn(xt, t)[..., :C]) ** 2)
    return hybrid, mse

  g_hybrid, g_mse = jax.jit(jax.jacrev(losses))(params)
  g_vb = jax.tree.map(lambda h, m: h - m, g_hybrid, g_mse)
  # Mean parameters: the hybrid gradient is the mse gradient alone.
  for k, sl in (("wm", np.s_[:]), ("b", np.s_[:, :C])):
    ref_norm = float(jnp.linalg.norm(g_mse[k][sl]))
    assert ref_norm > 0
    assert float(jnp.linalg.norm(g_vb[k][sl])) <= 1e-5 * ref_norm + 1e-9, k
  # Variance parameters learn from the bound term only.
  assert float(jnp.linalg.norm(g_vb["wv"])) > 0
  assert float(jnp.linalg.norm(g_mse["wv"])) == 0
  # (The 'kl' loss, by contrast, trains the mean: test_gradients_flow_through_every_loss.)


# ----------------------------------------------------------------------------------------------
# calc_bpd_loop on a 10-step process, where every term can be written down.
# ----------------------------------------------------------------------------------------------

T_SMALL = 10


def small_process(name="linear"):
  # Short and mild: alpha-bar_T ~ 0.3, so the prior term is far from 0.
  betas = ref.beta_schedule(name, T_SMALL, beta_start=0.01, beta_end=0.2)
  return gd.GaussianDiffusion.from_betas(betas), ref.Coefs(betas)


def decoder_nll_bpd(x0, log_var):
  """-log2 P(bin of x0) under N(x0, e^log_var), averaged over dims: [B]."""
  return -ref.mean_flat(ref.discretized_gaussian_loglik(x0, x0, 0.5 * log_var)) / ref.LOG2


LV_CONST = -3.7  # 'learned': the log variance output
V_CONST = 0.4    # 'learned_range': the interpolation output


def _true_x0_model(one, var_type):
  def denoise_fn(xt, t):
    out = jnp.broadcast_to(one, xt.shape)
    if var_type == "learned":
      out = jnp.concatenate([out, jnp.full(xt.shape, LV_CONST, jnp.float32)], -1)
    elif var_type == "learned_range":
      out = jnp.concatenate([out, jnp.full(xt.shape, V_CONST, jnp.float32)], -1)
    return out
  return denoise_fn


@jax.jit
def _bpd_true_x0_all(d, one, x0, key):
  return {v: gd.calc_bpd_loop(d, _true_x0_model(one, v), x0, key, mean_type="xstart",
                              var_type=v) for v in VAR_TYPES}


@pytest.mark.slow
def test_calc_bpd_loop_with_the_true_x0(rng):
  """mean_type 'xstart' returning the true x0 gives mu_theta = mu-tilde: closed forms."""
  shape = (3, 4, 4, 3)
  for name in ("linear", "quad", "cosine"):
    d, c = small_process(name)
    one = grid_data(rng, (1,) + shape[1:])
    x0 = np.broadcast_to(one, shape)  # identical examples: the model call may fold t into batch
    got_all = jax.device_get(_bpd_true_x0_all(d, jnp.asarray(one, jnp.float32),
                                              jnp.asarray(x0, jnp.float32),
                                              jax.random.key(int(rng.integers(2**31)))))
    for var_type, got in got_all.items():
      _check_bpd_true_x0(got, c, x0, f"{var_type} {name}")


def _check_bpd_true_x0(got, c, x0, what):
  var_type = what.split()[0]
  B = x0.shape[0]
  assert got["vb"].shape == (B, T_SMALL)
  assert got["total_bpd"].shape == (B,) and got["prior_bpd"].shape == (B,)
  assert got["xstart_mse"].shape == (B, T_SMALL) and got["mse"].shape == (B, T_SMALL)

  # log variance of p_theta per t, and the KL to the posterior N(mu, beta-tilde) with equal means.
  plv = c.posterior_log_variance_clipped
  if var_type == "fixedsmall":
    lv = plv
  elif var_type == "fixedlarge":
    lv = np.log(c.fixedlarge_variance)
  elif var_type == "learned":
    lv = np.full(T_SMALL, LV_CONST)
  else:
    frac = (V_CONST + 1) / 2
    lv = frac * np.log(c.betas) + (1 - frac) * plv
  kl = 0.5 * (-1.0 + lv - plv + np.exp(plv - lv)) / ref.LOG2
  want_vb = np.tile(kl, (B, 1))
  # t = 0: mu_theta = coef1_0 x0 + coef2_0 x_t = x0 exactly (coef1_0 = 1, coef2_0 = 0).
  want_vb[:, 0] = decoder_nll_bpd(x0, np.full(x0.shape, lv[0]))
  if var_type == "fixedsmall":
    np.testing.assert_allclose(want_vb[:, 1:], 0, atol=1e-12)
  np.testing.assert_allclose(got["vb"], want_vb, rtol=1e-4, atol=2e-6, err_msg=what)

  # Prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), independent of the model.
  abT = c.alphas_cumprod[-1]
  want_prior = ref.mean_flat(ref.normal_kl(math.sqrt(abT) * x0, math.log(1 - abT), 0.0, 0.0)) \
      / ref.LOG2
  np.testing.assert_allclose(got["prior_bpd"], want_prior, rtol=1e-5, atol=1e-6, err_msg=what)
  np.testing.assert_allclose(got["total_bpd"], want_vb.sum(1) + want_prior, rtol=1e-4,
                             err_msg=what)
  np.testing.assert_allclose(got["xstart_mse"], 0, atol=1e-10, err_msg=what)
  np.testing.assert_allclose(got["mse"], 0, atol=1e-6, err_msg=what)


def test_calc_bpd_loop_zero_terminal_snr_is_finite(rng):
  """jsd ends at beta = 1 (alpha-bar_T = 0): every output stays finite; the closed forms hold."""
  d, c = small_process("jsd")
  assert c.alphas_cumprod[-1] == 0.0
  shape = (3, 4, 4, 3)
  one = grid_data(rng, (1,) + shape[1:])
  x0 = np.broadcast_to(one, shape)
  got_all = jax.device_get(_bpd_true_x0_all(d, jnp.asarray(one, jnp.float32),
                                            jnp.asarray(x0, jnp.float32),
                                            jax.random.key(int(rng.integers(2**31)))))
  for var_type, got in got_all.items():
    for k in ("vb", "total_bpd", "prior_bpd", "xstart_mse"):
      assert np.all(np.isfinite(got[k])), (var_type, k)
    np.testing.assert_allclose(got["prior_bpd"], 0.0, atol=1e-6)  # q(x_T | x0) = N(0, I)
    # The eps-mse at alpha-bar = 0: eps_hat = (x_t - 0 x0_hat) / 1 = x_t = eps, so 0.
    assert np.all(np.isfinite(got["mse"])), (var_type, "mse", got["mse"][:, -1])
    _check_bpd_true_x0(got, c, x0, f"{var_type} jsd")


@pytest.mark.slow
def test_calc_bpd_loop_prior_and_sum(rng):
  """Any model: prior term independent of it, total = sum of terms + prior, terms >= 0."""
  d, c = small_process("quad")
  shape = (4, 4, 4, 2)
  x0 = grid_data(rng, shape)
  w = jnp.asarray(rng.normal(size=(shape[-1], 2 * shape[-1])), jnp.float32)

  def model(xt, t):  # any batch size: calc_bpd_loop may fold timesteps into the batch
    h = jnp.tanh(jnp.matmul(xt, w, precision=jax.lax.Precision.HIGHEST)
                 + 0.1 * t.astype(jnp.float32).reshape((-1, 1, 1, 1)))
    return h * jnp.asarray([1.5] * shape[-1] + [1.0] * shape[-1], jnp.float32)

  fn = jax.jit(functools.partial(gd.calc_bpd_loop, denoise_fn=model, mean_type="eps",
                                 var_type="learned_range", clip_denoised=True))
  got = jax.device_get(fn(d, x_start=jnp.asarray(x0, jnp.float32),
                          rng=jax.random.key(int(rng.integers(2**31)))))
  for k in ("vb", "total_bpd", "prior_bpd", "xstart_mse", "mse"):
    assert np.all(np.isfinite(got[k])), k
  assert np.all(got["vb"] >= -1e-6)   # KLs, and a decoder NLL of a discrete distribution
  assert np.all(got["xstart_mse"] >= 0) and np.all(got["mse"] >= 0)
  abT = c.alphas_cumprod[-1]
  want_prior = ref.mean_flat(ref.normal_kl(math.sqrt(abT) * x0, math.log(1 - abT), 0.0, 0.0)) \
      / ref.LOG2
  np.testing.assert_allclose(got["prior_bpd"], want_prior, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["total_bpd"], got["vb"].sum(1) + got["prior_bpd"], rtol=1e-5)
  np.testing.assert_allclose(gd.prior_bpd(d, jnp.asarray(x0, jnp.float32)), want_prior, rtol=1e-5)


def test_calc_bpd_loop_zero_model_statistics(rng):
  """eps-model returning 0, fixedsmall, no clip: mu-tilde - mu_theta = c1 (sigma/a) eps, so
  E[L_t] = 0.5 c1^2 sigma^2 / (a^2 beta-tilde) / log 2 per coordinate for t > 0."""
  d, c = small_process()
  shape = (64, 4, 4, 3)
  x0 = grid_data(rng, shape)
  fn = jax.jit(functools.partial(gd.calc_bpd_loop, denoise_fn=lambda x, t: jnp.zeros_like(x),
                                 mean_type="eps", var_type="fixedsmall", clip_denoised=False))
  got = jax.device_get(fn(d, x_start=jnp.asarray(x0, jnp.float32),
                          rng=jax.random.key(int(rng.integers(2**31)))))
  ts = np.arange(1, T_SMALL)
  per_coord = (0.5 * c.posterior_mean_coef1[ts] ** 2 * (1 - c.alphas_cumprod[ts])
               / (c.alphas_cumprod[ts] * c.posterior_variance[ts]) / ref.LOG2)
  # Each term averages B*D independent scaled chi^2_1 draws: relative s.e. sqrt(2 / (B D)).
  rel_se = math.sqrt(2.0 / np.prod(shape))
  np.testing.assert_allclose(got["vb"][:, 1:].mean(0), per_coord, rtol=6 * rel_se)
  # The eps-mse of the zero model is E[eps^2] = 1 for every t.
  np.testing.assert_allclose(got["mse"].mean(0), 1.0, rtol=6 * rel_se)
  # The noise differs between terms: their fluctuations are not identical across t.
  ratios = got["vb"][:, 1:] / per_coord
  assert np.std(ratios[:, 0] - ratios[:, 1]) > 1e-3


# ----------------------------------------------------------------------------------------------
# jit / vmap / pytree behaviour.
# ----------------------------------------------------------------------------------------------


def test_vmap_q_sample_over_pairs(rng):
  d, c = diffusion_and_coefs("linear", False)
  shape = (5, 4, 4, 3)
  x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, T, shape[0]), jnp.int32)
  one = lambda x, tt, n: gd.q_sample(d, x[None], tt[None], n[None])[0]
  got = jax.jit(jax.vmap(one))(x0, t, noise)
  np.testing.assert_allclose(got, gd.q_sample(d, x0, t, noise), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got, ref.q_sample(c, np.asarray(x0, np.float64), np.asarray(t),
                                               np.asarray(noise, np.float64)), rtol=1e-5, atol=1e-6)


def test_vmap_over_stacked_processes(rng):
  """A GaussianDiffusion is a pytree of arrays: a batch of schedules vmaps."""
  names = ("linear", "cosine", "quad")
  ds = [diffusion_and_coefs(n, False)[0] for n in names]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ds)
  shape = (4, 2, 2, 1)
  x0 = rng.uniform(-1, 1, shape)
  noise = rng.normal(size=shape)
  t = rng.integers(0, T, shape[0]).astype(np.int32)
  got = jax.vmap(lambda d: gd.q_sample(d, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                                       jnp.asarray(noise, jnp.float32)))(stacked)
  for i, n in enumerate(names):
    np.testing.assert_allclose(got[i], ref.q_sample(diffusion_and_coefs(n, False)[1], x0, t, noise),
                               rtol=1e-5, atol=1e-6)


def test_jit_does_not_retrace_for_a_new_schedule(rng):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(d, out, xt, t):
    return gd.p_mean_variance(d, out, xt, t, mean_type="v", var_type="learned_range")["mean"]

  shape = (2, 2, 2, 1)
  out = jnp.asarray(rng.normal(size=shape[:-1] + (2,)), jnp.float32)
  xt = jnp.asarray(rng.normal(size=shape), jnp.float32)
  t = jnp.asarray([3, 700], jnp.int32)
  for name in ("linear", "cosine", "jsd"):
    f(diffusion_and_coefs(name, False)[0], out, xt, t)
  chex.clear_trace_counter()


# ----------------------------------------------------------------------------------------------
# String options.
# ----------------------------------------------------------------------------------------------


def _raises_listing(fn, allowed):
  with pytest.raises(ValueError) as e:
    fn()
  msg = str(e.value)
  for a in allowed:
    assert a in msg, (a, msg)


def test_unknown_strings_raise_listing_allowed_values():
  d, _ = diffusion_and_coefs("linear", False)
  x = jnp.zeros((2, 2, 2, 1))
  t = jnp.zeros((2,), jnp.int32)
  model = lambda xt, tt: jnp.zeros(xt.shape[:-1] + (2,))
  _raises_listing(lambda: gd.p_mean_variance(d, x, x, t, mean_type="noise", var_type="fixedsmall"),
                  MEAN_TYPES)
  _raises_listing(lambda: gd.p_mean_variance(d, x, x, t, mean_type="eps", var_type="small"),
                  VAR_TYPES)
  _raises_listing(lambda: gd.training_losses(d, model, x, t, x, loss_type="l2", mean_type="eps",
                                             var_type="fixedsmall"), ref.LOSS_TYPES)
  _raises_listing(lambda: gd.training_losses(d, model, x, t, x, loss_type="mse", mean_type="x0",
                                             var_type="fixedsmall"), MEAN_TYPES)
  _raises_listing(lambda: gd.training_losses(d, model, x, t, x, loss_type="mse", mean_type="eps",
                                             var_type="learnt"), VAR_TYPES)
  _raises_listing(lambda: gd.calc_bpd_loop(d, model, x, jax.random.key(0), mean_type="epsilon",
                                           var_type="fixedsmall"), MEAN_TYPES)
  _raises_listing(lambda: gd.calc_bpd_loop(d, model, x, jax.random.key(0), mean_type="eps",
                                           var_type="fixed"), VAR_TYPES)


# ----------------------------------------------------------------------------------------------
# Timestep sampling (improved DDPM sec. 3.3): uniform, and importance sampling by the history.
# ----------------------------------------------------------------------------------------------


def test_uniform_timestep_sampler(rng):
  t, w = jax.jit(ts.sample_uniform, static_argnums=(1, 2))(jax.random.key(int(rng.integers(2**31))),
                                                            20_000, 7)
  t, w = np.asarray(t), np.asarray(w)
  assert t.shape == (20_000,) and t.dtype == np.int32
  np.testing.assert_array_equal(w, 1.0)
  counts = np.bincount(t, minlength=7)
  assert counts.size == 7 and t.min() >= 0
  # Each count ~ Binomial(n, 1/7): within 5 standard deviations.
  assert np.all(np.abs(counts - 20_000 / 7) < 5 * math.sqrt(20_000 * (1 / 7) * (6 / 7)))


def test_importance_timestep_sampler(rng):
  num_t, k, u = 12, 4, 1e-3
  hist = ts.LossHistory.create(num_t, history_per_term=k)
  update = jax.jit(ts.update_history)
  probs = jax.jit(ts.importance_probs)
  # The reference history: the last k losses per t, newest last.
  ref_hist = {t: [] for t in range(num_t)}
  scale = rng.uniform(0.1, 3.0, num_t)  # per-timestep loss scale
  rounds = 0
  while min(len(v) for v in ref_hist.values()) < k:
    if rounds == 2:  # not warmed up yet: uniform
      np.testing.assert_allclose(probs(hist), np.full(num_t, 1 / num_t), rtol=1e-6)
    t = rng.integers(0, num_t, 16).astype(np.int32)
    losses = (scale[t] * rng.uniform(0.5, 1.5, 16)).astype(np.float32)
    hist = update(hist, jnp.asarray(t), jnp.asarray(losses))
    for ti, li in zip(t, losses):
      ref_hist[int(ti)] = (ref_hist[int(ti)] + [float(li)])[-k:]
    rounds += 1
  for t in range(num_t):
    np.testing.assert_allclose(np.asarray(hist.losses)[t], ref_hist[t], rtol=1e-7)
  rms = np.array([math.sqrt(np.mean(np.square(ref_hist[t]))) for t in range(num_t)])
  want = (1 - u) * rms / rms.sum() + u / num_t
  np.testing.assert_allclose(probs(hist), want, rtol=1e-5)
  n = 40_000
  t, w = jax.jit(ts.sample_importance, static_argnums=(2,))(
      hist, jax.random.key(int(rng.integers(2**31))), n)
  t, w = np.asarray(t), np.asarray(w)
  np.testing.assert_allclose(w, 1.0 / (num_t * want[t]), rtol=1e-5)
  counts = np.bincount(t, minlength=num_t)
  assert np.all(np.abs(counts - n * want) < 5 * np.sqrt(n * want * (1 - want)) + 1)
  # Unbiased: the weighted sample mean of any per-timestep L estimates (1/T) sum_t L_t.
  L = rng.uniform(0, 1, num_t)
  wl = w * L[t]
  assert abs(wl.mean() - L.mean()) < 5 * wl.std() / math.sqrt(n)
