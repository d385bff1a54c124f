"""Respacing (Nichol & Dhariwal 2021): the same process seen at K < T of its timesteps.

Host-side NumPy on concrete arrays (not inside `jit`): the kept timesteps and the β's that keep
ᾱ at each of them, so the marginals q(x_τ | x₀) are unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffusion_jax.process.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` timesteps out of `range(num_timesteps)`, evenly spaced, both ends included.

  Returns a sorted int NumPy array `[num_steps]`; one step keeps only the last timestep.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps!r}')
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  stride = (num_timesteps - 1) / (num_steps - 1)
  steps = np.round(np.arange(num_steps) * stride).astype(np.int64)
  assert len(np.unique(steps)) == num_steps, steps
  return steps


def respace(d: GaussianDiffusion, use_timesteps: Sequence[int]) -> GaussianDiffusion:
  """The process restricted to `use_timesteps`, with the respaced β's.

  β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}} (ᾱ_{τ_{−1}} = 1) keeps ᾱ at every kept step, so the
  marginals q(x_τ | x₀) are unchanged. `timestep_map` holds the original timesteps τ_i that
  the model is fed. Runs on the host: `d` must hold concrete arrays (not inside `jit`).
  """
  steps = np.asarray(sorted(set(int(s) for s in use_timesteps)))
  if steps.size == 0 or steps[0] < 0 or steps[-1] >= d.num_timesteps:
    raise ValueError(f'use_timesteps must be a non-empty subset of range({d.num_timesteps}), '
                     f'got {list(use_timesteps)!r}')
  ab = np.cumprod(1.0 - np.asarray(d.betas, np.float64))[steps]
  betas = 1.0 - ab / np.append(1.0, ab[:-1])
  old_map = np.asarray(d.timestep_map)
  return GaussianDiffusion.from_betas(betas, timestep_map=old_map[steps])
