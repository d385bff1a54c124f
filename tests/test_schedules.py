"""β schedules against float64 re-derivations (tests/numpy_reference.py) and golden figures."""

import math

import numpy as np
import pytest

from diffusion_jax.process import schedules
try:
  from tests import numpy_reference as ref
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import numpy_reference as ref

NAMES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine", "sigmoid")


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1000, 37, 2])
def test_schedule_matches_reference(name, T, zero_terminal_snr):
  kwargs = dict(zero_terminal_snr=True) if zero_terminal_snr else {}
  got = schedules.get_beta_schedule(name, T, **kwargs)
  want = ref.beta_schedule(name, T)
  if zero_terminal_snr:
    want = ref.zero_terminal_snr(want)
  assert isinstance(got, np.ndarray) and got.dtype == np.float64
  assert got.shape == (T,)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
  assert np.all(got > 0) and np.all(got <= 1)


@pytest.mark.parametrize("name", ["linear", "quad", "const", "warmup10", "warmup50", "sigmoid"])
def test_schedule_endpoint_kwargs(name, rng):
  lo = float(rng.uniform(1e-5, 1e-3))
  hi = float(rng.uniform(0.01, 0.2))
  T = int(rng.integers(20, 300))
  got = schedules.get_beta_schedule(name, T, beta_start=lo, beta_end=hi)
  np.testing.assert_allclose(got, ref.beta_schedule(name, T, beta_start=lo, beta_end=hi),
                             rtol=1e-9, atol=1e-15)


def test_linear_defaults_are_the_papers():
  got = schedules.get_beta_schedule("linear", 1000)
  assert got[0] == pytest.approx(1e-4, rel=1e-12)
  assert got[-1] == pytest.approx(0.02, rel=1e-12)
  # Not rescaled with T: a 500-step schedule has the same endpoints.
  got = schedules.get_beta_schedule("linear", 500)
  assert got[0] == pytest.approx(1e-4, rel=1e-12)
  assert got[-1] == pytest.approx(0.02, rel=1e-12)
  np.testing.assert_allclose(np.diff(got), (0.02 - 1e-4) / 499, rtol=1e-9)


def test_cosine_kwargs():
  got = schedules.get_beta_schedule("cosine", 200, cosine_s=0.05, max_beta=0.5)
  np.testing.assert_allclose(got, ref.beta_schedule("cosine", 200, s=0.05, max_beta=0.5),
                             rtol=1e-9, atol=1e-15)
  assert got.max() == 0.5  # the clip is hit at the end of a cosine schedule


def test_cosine_alpha_bar_is_the_papers():
  # Nichol & Dhariwal eq. 17: prod(1 - beta) follows f(t)/f(0) until the clip.
  T = 1000
  betas = schedules.get_beta_schedule("cosine", T)
  s = 0.008
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  abar = np.cumprod(1 - betas)
  want = np.array([f((i + 1) / T) / f(0) for i in range(T)])
  unclipped = betas < 0.999
  first_clip = np.argmin(unclipped) if not unclipped.all() else T
  np.testing.assert_allclose(abar[:first_clip], want[:first_clip], rtol=1e-9, atol=1e-15)


def test_jsd_values():
  got = schedules.get_beta_schedule("jsd", 4)
  np.testing.assert_allclose(got, [1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-15)


def test_warmup_values():
  got = schedules.get_beta_schedule("warmup10", 100, beta_start=0.001, beta_end=0.05)
  np.testing.assert_allclose(got[:10], np.linspace(0.001, 0.05, 10), rtol=1e-12)
  np.testing.assert_array_equal(got[10:], 0.05)
  got = schedules.get_beta_schedule("warmup50", 7, beta_start=0.001, beta_end=0.05)
  np.testing.assert_allclose(got[:3], np.linspace(0.001, 0.05, 3), rtol=1e-12)
  np.testing.assert_array_equal(got[3:], 0.05)


def test_golden_figures_linear():
  # T = 500 linear (1e-4 .. 0.02): sqrt(abar_T) ~ 0.0797, 1 - abar_T ~ 0.99365.
  b = schedules.get_beta_schedule("linear", 500)
  abar = np.cumprod(1 - b)
  assert abs(math.sqrt(abar[-1]) - 0.0797) <= 0.5e-4
  assert abs((1 - abar[-1]) - 0.99365) <= 0.5e-5
  # T = 1000 linear: posterior variance beta-tilde at t = 487 ~ 0.00979 and at t = 999 ~ 0.02.
  b = schedules.get_beta_schedule("linear", 1000)
  abar = np.cumprod(1 - b)
  abar_prev = np.append(1.0, abar[:-1])
  pv = b * (1 - abar_prev) / (1 - abar)
  assert abs(pv[487] - 0.00979) <= 0.5e-5
  assert abs(pv[999] - 0.02) <= 0.5e-4


@pytest.mark.parametrize("name", NAMES)
def test_rescale_zero_terminal_snr(name):
  T = 300
  betas = ref.beta_schedule(name, T)
  got = schedules.rescale_zero_terminal_snr(betas)
  np.testing.assert_allclose(got, ref.zero_terminal_snr(betas), rtol=1e-10, atol=1e-15)
  # Properties from Lin et al.: the last beta is 1 (alpha-bar_T = 0, SNR_T = 0), the first
  # sqrt(alpha-bar) and hence the first beta are unchanged, and SNR stays decreasing.
  assert got[-1] == pytest.approx(1.0, abs=1e-12)
  assert got[0] == pytest.approx(betas[0], rel=1e-9)
  r = np.sqrt(np.cumprod(1 - got))
  assert r[-1] == pytest.approx(0.0, abs=1e-7)
  assert np.all(np.diff(r) < 0)
  # sqrt(alpha-bar) is an affine function of the original one.
  r0 = np.sqrt(np.cumprod(1 - betas))
  slope, intercept = np.polyfit(r0, r, 1)
  np.testing.assert_allclose(r, slope * r0 + intercept, atol=1e-9)
  # Idempotent.
  np.testing.assert_allclose(schedules.rescale_zero_terminal_snr(got), got, rtol=1e-9, atol=1e-12)


def test_unknown_schedule_raises_with_names():
  with pytest.raises(ValueError) as e:
    schedules.get_beta_schedule("not_a_schedule", 100)
  for name in NAMES:
    assert name in str(e.value)


@pytest.mark.parametrize("T", [0, -3])
def test_bad_num_timesteps_raises(T):
  with pytest.raises(ValueError):
    schedules.get_beta_schedule("linear", T)
