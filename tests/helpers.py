"""The tests' shared helpers that need `diffusion_jax`, JAX's devices or child processes (the
pure math is in tests/oracles.py). No test module imports another: what two of them share lives
here, in tests/oracles.py or in a fixture of tests/conftest.py."""

from __future__ import annotations

import functools
import socket

import jax
import numpy as np

from diffusion_jax.process import continuous as ct
from diffusion_jax.process import gaussian_diffusion as gd

import oracles  # tests/ is on sys.path under pytest's rootdir conftest


# ------------------------------------------------------------------------------------------
# Devices and data.
# ------------------------------------------------------------------------------------------


def mesh(n: int) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh of the first n devices, with explicit sharding."""
  return jax.make_mesh((n,), ('data',), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Explicit,))


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images `[N, 8, 8, 1]` and labels `[N]` of a split, straight from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import digits as digits_lib  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  idx = digits_lib.split_indices()[split]
  return digits_lib.to_uint8(d.images[idx])[..., None], d.target[idx].astype(np.int32)


def digits_spec(config_name: str, teacher=None, **changes):
  """The spec of `configs/<config_name>.py` on the digits (their facts, no dataset read), with
  `changes` as {'group.name': value}."""
  import importlib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{config_name}').get_config()
  for key, value in changes.items():
    group, name = key.split('.')
    setattr(config[group], name, value)
  info = input_pipeline.ImageDatasetInfo('digits', (8, 8, 1), 10, {'train': 1500, 'test': 297})
  return spec_lib.ExperimentSpec.from_config(config, info, teacher=teacher)


# ------------------------------------------------------------------------------------------
# Processes and their exact denoisers.
# ------------------------------------------------------------------------------------------


def linear_vp_process(num_timesteps: int = 1000) -> ct.VPProcess:
  """The VP process of DDPM's linear betas, 1e-4 to 0.02."""
  return ct.VPProcess.from_diffusion(
      gd.GaussianDiffusion.from_betas(np.linspace(1e-4, 0.02, num_timesteps)))


def model_time(process, n):
  """The continuous time of the network's noise coordinate n: the inverse of
  `process.model_timestep` (n = log σ for VE, 999·t for sub-VP, 1000·t for the flow, T·t − 1
  for VP)."""
  if process.kind is ct.ProcessKind.VE:
    return process.t_of_lambda(-n)      # α = 1: λ = −log σ
  if process.kind is ct.ProcessKind.SUBVP:
    return n / 999.0
  if process.kind is ct.ProcessKind.FLOW:
    return n / 1000.0
  return (n + 1.0) / process.num_timesteps


def _input_scale(process, n):
  return process.input_scale(model_time(process, n))


def gaussian_denoise_fn(process, mu: float, s: float, mean_type: str = 'eps', **kwargs):
  """The exact network of x₀ ~ N(mu, s²) per coordinate under any process, as
  `denoise_fn(c_in·x, model_timestep)`: what `continuous.make_denoiser` calls
  (`oracles.gaussian_denoise_fn`; `kwargs` go to it)."""
  return oracles.gaussian_denoise_fn(
      oracles.process_alpha_sigma(process, functools.partial(model_time, process)), mu, s,
      mean_type, input_scale=functools.partial(_input_scale, process), **kwargs)


def correlated_denoise_fn(process):
  """The exact ε of the correlated Gaussian data of `oracles.correlated_denoise_fn` under any
  process, as `denoise_fn(c_in·x, model_timestep)`."""
  return oracles.correlated_denoise_fn(
      oracles.process_alpha_sigma(process, functools.partial(model_time, process)),
      functools.partial(_input_scale, process))


# ------------------------------------------------------------------------------------------
# Child processes.
# ------------------------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port free on loopback now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def assert_ok(result):
  """A `subprocess.run` result that exited 0; returns it."""
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def assert_one_error_line(result, *fragments: str) -> str:
  """The command exited 1 with exactly one `error: ` line on stderr, which contains every
  fragment; returns that line."""
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  for f in fragments:
    assert f in errors[0], (f, errors[0])
  return errors[0]
