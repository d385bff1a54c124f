"""The discrete chains, the `ddpm` and `ddim` solvers of `diffusion_jax.sampling.solvers` (run
through `sampling.sampler.sample` / `encode` or the solvers themselves), and respacing
(`diffusion_jax.process.respacing`), driven by the exact denoiser of Gaussian data.

When every data coordinate is iid N(mu, s^2), x_t = a x0 + sigma eps (a = sqrt(abar_t),
sigma = sqrt(1 - abar_t)) and E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2). With that
denoiser every sampler step is an affine map of x plus Gaussian noise, so the law of the output
is computed exactly in float64 (tests/numpy_reference.py: oracle_affine_*) and compared with the
samples; deterministic samplers (DDIM with x_init, the DDIM encoder) are compared elementwise.

The oracle reads the DISCRETE process's own float64 tables at the integer timestep it is fed:
the chains place their levels on the nodes t_n = (n + 1)/T of `VPProcess.from_diffusion(d)`,
where the model must see DDPM's integer n itself (a non-integer timestep makes it return NaN).
`steps` of ddpm/ddim counts the levels, i.e. the model evaluations; their default levels are
`space_timesteps(T, steps)`. Step i of a chain of N steps draws its noise from
`fold_in(rng, N - i)`. That the same key gives the old chains' samples is
tests/test_golden_chains.py's claim.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax
from diffusion_jax.process import continuous as ct
from diffusion_jax.process import gaussian_diffusion as gd
from diffusion_jax.process import respacing
from diffusion_jax.sampling import config as config_lib
from diffusion_jax.sampling import sampler as sampler_lib
from diffusion_jax.sampling import solvers

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
SamplerConfig = config_lib.SamplerConfig


def jax_key(rng):
  return jax.random.key(int(rng.integers(2**31)))


@functools.lru_cache(maxsize=None)
def linear_process():
  betas = ref.beta_schedule("linear", T)
  return gd.GaussianDiffusion.from_betas(betas), ref.Coefs(betas)


@functools.lru_cache(maxsize=None)
def vp(which="linear"):
  """The continuous view of the full process, on which the chains run."""
  d = (linear_process() if which == "linear" else zero_terminal_snr_process())[0]
  return ct.VPProcess.from_diffusion(d)


def oracle(c, mean_type="eps"):
  """The exact denoiser for the ORIGINAL process c, indexed by the integer timestep it is fed
  (tests/oracles.py; finite at alpha-bar = 0, zero terminal SNR); NaN where that timestep is not
  an integer."""
  table = oracles.gaussian_denoise_fn(oracles.table_alpha_sigma(c.alphas_cumprod), MU, S,
                                      mean_type)

  def denoise_fn(x, n):
    n_int = jnp.round(n).astype(jnp.int32)
    on_node = jnp.reshape(n == n_int, (-1,) + (1,) * (x.ndim - 1))
    return jnp.where(on_node, table(x, n_int), jnp.nan)
  return denoise_fn


def sampler_fn(c, process, shape, config, mean_type="eps", var_type="fixedlarge"):
  """`fn(rng, x_init=None) -> x0`: `sample` jitted with the oracle, the process and the
  sampler closed over (the chains' coefficients are computed on the host)."""
  param = gd.Parameterization(mean_type, var_type)

  @jax.jit
  def fn(rng, x_init=None):
    return sampler_lib.sample(oracle(c, mean_type), process, shape, rng, sampler=config,
                              parameterization=param, x_init=x_init)[0]
  return fn


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


def respaced_coefs(c, use):
  """ref.Coefs of the process restricted to the timesteps `use` (alpha-bar kept at each)."""
  ab = c.alphas_cumprod[np.asarray(use)]
  return ref.Coefs(1 - ab / np.concatenate([[1.0], ab[:-1]]))


# ----------------------------------------------------------------------------------------------
# space_timesteps / respace.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps,num_steps", [(1000, 50), (1000, 1000), (1000, 7),
                                                     (10, 3), (4000, 250), (1000, 2), (100, 99)])
def test_space_timesteps(num_timesteps, num_steps):
  ts = np.asarray(respacing.space_timesteps(num_timesteps, num_steps))
  assert ts.shape == (num_steps,)
  assert np.issubdtype(ts.dtype, np.integer)
  assert np.all(np.diff(ts) > 0)                         # sorted, distinct
  assert ts[0] == 0 and ts[-1] == num_timesteps - 1      # both ends (docstring)
  gaps = np.diff(ts)
  assert gaps.max() - gaps.min() <= 1                    # evenly spaced up to rounding
  assert np.all(np.abs(ts - np.linspace(0, num_timesteps - 1, num_steps)) <= 1.0)


def test_space_timesteps_one_step():
  np.testing.assert_array_equal(respacing.space_timesteps(1000, 1), [999])


def test_respace(rng):
  d, c = linear_process()
  k = int(rng.integers(5, 200))
  use = np.sort(rng.choice(T, size=k, replace=False))
  rd = respacing.respace(d, use)
  ab = c.alphas_cumprod[use]
  rc = respaced_coefs(c, use)
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
  full = respacing.respace(d, np.arange(T))
  np.testing.assert_allclose(full.betas, d.betas, rtol=1e-5)


def test_public_names_at_package_level():
  for name, module in (("sample", sampler_lib), ("encode", sampler_lib),
                       ("SamplerConfig", config_lib), ("space_timesteps", respacing),
                       ("respace", respacing), ("solve", solvers), ("SOLVERS", solvers),
                       ("level_schedule", solvers), ("step_schedule", solvers),
                       ("StepSchedule", solvers), ("VPProcess", ct)):
    assert getattr(diffusion_jax, name) is getattr(module, name), name
  # The chains are solvers in the one registry; the old chain functions are gone.
  assert diffusion_jax.SOLVERS["ddpm"].fn is solvers.ddpm
  assert diffusion_jax.SOLVERS["ddim"].fn is solvers.ddim
  for gone in ("p_sample", "p_sample_loop", "p_sample_loop_progressive", "ddim_sample_loop",
               "ddim_reverse_sample_loop"):
    assert not hasattr(diffusion_jax, gone), gone


def test_default_levels_are_the_respaced_timesteps():
  """`steps` K of ddpm/ddim puts the K levels on the nodes of space_timesteps(T, K), T - 1
  first: where the old chains over respace(d, space_timesteps(T, K)) evaluated the model."""
  process = vp()
  nodes = np.asarray(process.t_nodes)
  for kind in ("ddpm", "ddim"):
    for k in (1, 2, 7, 50, T):
      sched = sampler_lib.schedule_of(SamplerConfig(kind, steps=k), process)
      want = nodes[respacing.space_timesteps(T, k)[::-1]]
      np.testing.assert_array_equal(np.asarray(sched.t), want, err_msg=f"{kind} {k}")


# ----------------------------------------------------------------------------------------------
# Ancestral sampling.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_ancestral_sampler_reproduces_gaussian_data(rng, var_type):
  d, c = linear_process()
  fn = sampler_fn(c, vp(), SAMPLE_SHAPE, SamplerConfig("ddpm", clip_denoised=False), "eps",
                  var_type)
  x = jax.device_get(fn(jax_key(rng)))
  assert x.shape == SAMPLE_SHAPE
  assert_reproduces_data(x, 0.02, var_type)
  m, v, _ = ref.oracle_affine_ancestral(c, MU, S, var_type)
  assert_gaussian_stats(x, m, math.sqrt(v), var_type)


@pytest.mark.slow
@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_respaced_ancestral_sampler(rng, var_type):
  """50 of 1000 levels: the law of the output is the exact composition on the respaced process
  (the oracle is fed the original timesteps space_timesteps(T, 50); fed 0..49 instead, or any
  timestep off the nodes, it would be far off)."""
  d, c = linear_process()
  rc = respaced_coefs(c, respacing.space_timesteps(T, 50))
  fn = sampler_fn(c, vp(), SAMPLE_SHAPE, SamplerConfig("ddpm", steps=50, clip_denoised=False),
                  "eps", var_type)
  x = jax.device_get(fn(jax_key(rng)))
  m, v, _ = ref.oracle_affine_ancestral(rc, MU, S, var_type)
  assert_gaussian_stats(x, m, math.sqrt(v), f"respaced {var_type}")


@pytest.mark.slow
def test_recorded_chain_and_single_steps(rng):
  """`record` sees x_t fed to the model at every level, once, with its x̂₀; each step is
  N(mu_theta, var_t)."""
  d, c = linear_process()
  process = vp()
  var_type = "fixedlarge"
  save = [999, 500, 1, 0]
  where = {float(np.asarray(process.t_nodes)[s]): k for k, s in enumerate(save)}
  chain = np.full((len(save),) + SAMPLE_SHAPE, np.nan, np.float32)
  pred = np.full_like(chain, np.nan)
  seen = []

  def record(t, x, x0_hat):
    t = np.asarray(t)
    assert np.all(t == t[0])
    seen.append(float(t[0]))
    k = where.get(float(t[0]))
    if k is not None:
      chain[k], pred[k] = np.asarray(x), np.asarray(x0_hat)

  config = SamplerConfig("ddpm", clip_denoised=False)
  param = gd.Parameterization("eps", var_type)
  key = jax_key(rng)
  recorded = jax.jit(lambda key: sampler_lib.sample(oracle(c), process, SAMPLE_SHAPE, key,
                                                    sampler=config, parameterization=param,
                                                    record=record))
  x0, nfe = jax.device_get(recorded(key))
  jax.effects_barrier()
  # Every level once, from t = 1 down: T evaluations, the final x̂₀ included.
  assert int(nfe) == T
  np.testing.assert_array_equal(seen, np.asarray(process.t_nodes)[::-1])
  # Same rng, same x0 as without `record` (up to float32 rounding: two different XLA programs).
  plain = sampler_fn(c, process, SAMPLE_SHAPE, config, "eps", var_type)(key)
  np.testing.assert_allclose(x0, np.asarray(plain), rtol=1e-5, atol=2e-5)

  _, _, before = ref.oracle_affine_ancestral(c, MU, S, var_type)
  chain64 = chain.astype(np.float64)
  for k, t in enumerate(save):
    m, v = before[t]
    assert_gaussian_stats(chain64[k], m, math.sqrt(v), f"chain at t={t}")
    # x̂₀ = E[x0 | x_t] = (x - sigma eps_hat) / a, exactly (no clipping).
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


def test_ddpm_single_step(rng):
  """One ddpm step between adjacent nodes t -> t - 1 (a 2-level schedule, N = 1: its noise is
  fold_in(rng, 1)) is N(mu_theta, var_t); from t = 1, `solve`'s final x̂₀ at t = 0 is the
  chain's last, noiseless step, whose output is the mean of p(x | x_0)."""
  d, c = linear_process()
  process = vp()
  shape = (4096, 4, 1, 1)
  x = rng.normal(size=shape).astype(np.float32)
  denoiser = ct.make_denoiser(process, oracle(c), "eps")

  def step_fn(t):
    """jit of (x, key) -> (x at t - 1, the final x̂₀ there, x̂₀ at t); the schedule is built on
    the host."""
    sched = solvers.schedule_from_times(process, process.t_nodes[np.array([t, t - 1])])

    @jax.jit
    def step(x, key):
      pred = denoiser(x, jnp.full((shape[0],), process.t_nodes[t]))[0]
      sol = solvers.solve("ddpm", denoiser, x, sched, key, variance="fixedsmall")
      return sol.x_end, sol.x0, pred
    return step

  def reference(x64, t):
    return ref.p_mean_variance(c, ref.oracle_eps_gain(c.alphas_cumprod[t], S) *
                               (x64 - c.sqrt_alphas_cumprod[t] * MU),
                               x64, np.full(shape[0], t), "eps", "fixedsmall", clip=False)

  def assert_pred(pred, p, t):
    np.testing.assert_allclose(pred, p["pred_xstart"], rtol=1e-4, atol=1e-4 * (1 + 1 / math.sqrt(
        c.alphas_cumprod[t])), err_msg=f"t={t}")

  for t in (1, 700):
    x_prev, x0, pred = jax.device_get(step_fn(t)(jnp.asarray(x), jax_key(rng)))
    p = reference(x.astype(np.float64), t)
    assert_pred(pred, p, t)
    assert_gaussian_stats((x_prev - p["mean"]) / np.sqrt(p["variance"]), 0.0, 1.0, f"t={t}")
    if t == 1:  # the last step, t = 0: x̂₀ of the state at t = 0, no noise
      p0 = reference(x_prev.astype(np.float64), 0)
      assert_pred(x0, p0, 0)
      np.testing.assert_allclose(x0, p0["mean"], rtol=1e-5, atol=1e-5)
  # x̂₀ at t = 0 of the same x.
  pred0 = jax.jit(lambda x: denoiser(x, jnp.full((shape[0],), process.t_nodes[0]))[0])(x)
  assert_pred(np.asarray(pred0), reference(x.astype(np.float64), 0), 0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_one_level_is_x0_of_the_prior_draw(kind):
  """steps=1 (level_schedule: t = 1 alone): the sample is x̂₀ of the prior draw, as the old
  chains over space_timesteps(T, 1) = [999] returned."""
  d, c = linear_process()
  process = vp()
  shape = (16, 2, 2, 1)
  key = jax.random.key(0)
  x = sampler_fn(c, process, shape, SamplerConfig(kind, steps=1, clip_denoised=False))(key)
  x_T = np.asarray(process.prior_sample(jax.random.split(key)[0], shape), np.float64)
  g, h = ref.oracle_x0_affine(c.alphas_cumprod[T - 1], MU, S)  # x̂₀ = g x + h at t = T - 1
  # float32 rounding of x - σ ε̂ is divided by α = 0.0064 there: ~2e-5.
  np.testing.assert_allclose(np.asarray(x), g * x_T + h, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# DDIM.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddim_all_steps_reproduces_gaussian_data(rng):
  d, c = linear_process()
  fn = sampler_fn(c, vp(), SAMPLE_SHAPE, SamplerConfig("ddim", steps=T, clip_denoised=False))
  x = jax.device_get(fn(jax_key(rng)))
  assert x.shape == SAMPLE_SHAPE
  assert_reproduces_data(x, 0.02, "ddim T steps")
  m, v = ref.oracle_affine_ddim(c.alphas_cumprod, MU, S, 0.0)
  assert_gaussian_stats(x, m, math.sqrt(v), "ddim T steps")


@pytest.mark.slow
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_matches_exact_composition(rng, eta):
  """With 50 steps the std is intrinsically ~5% low (eta=0); the composed maps predict it."""
  d, c = linear_process()
  use = np.asarray(respacing.space_timesteps(T, 50))
  fn = sampler_fn(c, vp(), SAMPLE_SHAPE,
                  SamplerConfig("ddim", steps=50, eta=eta, clip_denoised=False))
  x = np.asarray(jax.device_get(fn(jax_key(rng))), np.float64)
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
  """The DDIM encoder (`encode`'s docstring): x0 is lifted to abar[use[0]] with eps_hat of the
  model there at x0 itself; then step i goes abar[use[i-1]] -> abar[use[i]] with eps_hat at the
  current state and timestep use[i-1]. Written as step i from abar_prev (1 at the start) with
  eps_hat at timestep use[max(i-1, 0)]."""
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
def _ddim_deterministic(x_init, x_start, num_steps):
  c = linear_process()[1]
  process = vp()
  config = SamplerConfig("ddim", steps=num_steps, clip_denoised=False)
  outs = {}
  for m in ("eps", "v", "xstart"):
    param = gd.Parameterization(m, "fixedlarge")
    outs[("decode", m)] = sampler_lib.sample(
        oracle(c, m), process, x_init.shape, jax.random.key(0), sampler=config,
        parameterization=param, x_init=x_init)[0]
    outs[("encode", m)] = sampler_lib.encode(oracle(c, m), process, x_start, sampler=config,
                                             parameterization=param)
  return outs


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_decode_and_encode_elementwise(rng, num_steps):
  """Deterministic paths: every element equals the float64 composed affine map, for eps, v and
  xstart parametrisations of the same exact denoiser."""
  d, c = linear_process()
  use = np.asarray(respacing.space_timesteps(T, num_steps))
  shape = (64, 4, 4, 1)
  x_init = rng.normal(size=shape).astype(np.float32)
  x_start = (MU + S * rng.normal(size=shape)).astype(np.float32)
  outs = jax.device_get(_ddim_deterministic(x_init, x_start, num_steps=num_steps))
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
  use = np.asarray(respacing.space_timesteps(T, 20))
  shape = (256, 2, 2, 1)
  x_init = rng.normal(size=shape).astype(np.float32)
  fn = sampler_fn(c, vp("zero_snr"), shape, SamplerConfig("ddim", steps=20, clip_denoised=False),
                  mean_type)
  x = np.asarray(fn(jax_key(rng), x_init=jnp.asarray(x_init)))
  assert np.all(np.isfinite(x)), f"{np.isnan(x).mean():.0%} NaN"
  A, B = ddim_affine_decode(c.alphas_cumprod[use], MU, S)
  np.testing.assert_allclose(x, A * x_init.astype(np.float64) + B, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_ancestral_zero_terminal_snr_v_prediction(rng):
  """Respaced ancestral sampling on a zero-terminal-SNR process with v prediction."""
  d, c = zero_terminal_snr_process()
  rc = respaced_coefs(c, respacing.space_timesteps(T, 50))
  assert rc.betas[-1] == 1.0
  fn = sampler_fn(c, vp("zero_snr"), SAMPLE_SHAPE,
                  SamplerConfig("ddpm", steps=50, clip_denoised=False), "v", "fixedsmall")
  x = jax.device_get(fn(jax_key(rng)))
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
  fn = sampler_fn(c, vp(), SAMPLE_SHAPE,
                  SamplerConfig("ddim", steps=T, eta=1.0, clip_denoised=False))
  x = jax.device_get(fn(jax_key(rng)))
  assert_gaussian_stats(x, m_a, math.sqrt(v_a), "ddim eta=1")


def test_clip_denoised_keeps_samples_in_range(rng):
  """The chain's last step returns the clipped x̂₀: `solve`'s own x0, before `sample` clips
  again; and the data's N(0.3, 0.5²) leaves [-1, 1] often enough to need it."""
  d, c = linear_process()
  process = vp()
  config = SamplerConfig("ddim", steps=20, clip_denoised=True)
  key = jax_key(rng)
  x = np.asarray(sampler_fn(c, process, (256, 2, 2, 1), config)(key))
  denoiser = sampler_lib.model_denoiser(oracle(c), process, sampler=config,
                                        parameterization=gd.Parameterization("eps"))
  x_T = process.prior_sample(key, (256, 2, 2, 1))
  sol = jax.jit(lambda x_T: solvers.solve(
      "ddim", denoiser, x_T, sampler_lib.schedule_of(config, process)))(x_T)
  solved = np.asarray(sol.x0)
  assert np.all(np.abs(x) <= 1.0 + 1e-6)
  assert np.all(np.abs(solved) <= 1.0 + 1e-6)
  unclipped = np.asarray(sampler_fn(c, process, (256, 2, 2, 1),
                                    SamplerConfig("ddim", steps=20, clip_denoised=False))(key))
  assert np.mean(np.abs(unclipped) > 1.0) > 0.01


def test_sampler_strings_validated():
  d, c = linear_process()
  process = vp()
  with pytest.raises(ValueError) as e:
    gd.Parameterization("noise", "fixedsmall")
  assert "eps" in str(e.value) and "xstart" in str(e.value)
  with pytest.raises(ValueError) as e:
    gd.Parameterization("eps", "small")
  assert "fixedsmall" in str(e.value) and "learned_range" in str(e.value)
  with pytest.raises(ValueError) as e:
    gd.Parameterization("epsilon", "fixedlarge")
  assert "eps" in str(e.value) and "xstart" in str(e.value)
  with pytest.raises(ValueError) as e:
    SamplerConfig("ddmp", steps=5)
  assert "ddpm" in str(e.value) and "ddim" in str(e.value)
  with pytest.raises(ValueError) as e:
    SamplerConfig("ddpm", eta=0.5)
  assert "ddim" in str(e.value)
  # The solver's own string: the ddpm variance.
  denoiser = ct.make_denoiser(process, oracle(c), "eps")
  with pytest.raises(ValueError) as e:
    solvers.solve("ddpm", denoiser, jnp.zeros((2, 1)), solvers.level_schedule(process, 5),
                  jax.random.key(0), variance="small")
  assert "fixedsmall" in str(e.value) and "learned_range" in str(e.value)
