"""diffusion_jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX.

This module names the public API of pure functions (jit/vmap/grad-safe, explicit keys, no IO):

* the processes (`process/`): β schedules; DDPM's `GaussianDiffusion` with q(x_t | x₀), the
  posterior, p_θ(x_{t−1} | x_t), the losses and exact bits/dim; respacing; the continuous-time
  VP, VE and sub-VP processes (`VPProcess`, `VEProcess`, `SubVPProcess`) and the model as a
  denoiser (`make_denoiser`);
* sampling (`sampling/`): one registry of samplers, `SOLVERS` (ddpm, ddim, euler, heun,
  dpmpp_2m/3m, sde, pc, ode, ald), each a function of (denoiser, x, schedule, rng); `solve`;
  `sample` and `encode` from a model's `denoise_fn(x_t, timesteps)` with a `SamplerConfig`;
* `timestep_sampler`'s importance sampling of t (training/).

The rest — training, evaluation, storage, the runtime — is reached through its folder
(`diffusion_jax.training.loop`, ...), and the entry points train.py, sample.py, evaluate.py.
"""

from diffusion_jax.process.continuous import (
    SubVPProcess, VEProcess, VPProcess, clip_x0, make_denoiser)
from diffusion_jax.process.gaussian_diffusion import (
    GaussianDiffusion, LossType, MeanType, Parameterization, VarType, calc_bpd_loop,
    discretized_gaussian_log_likelihood, get_v, mean_flat, min_snr_weight, normal_kl,
    p_mean_variance, predict_noise_from_start, predict_start_from_noise, predict_start_from_v,
    prior_bpd, q_mean_variance, q_posterior_mean_variance, q_sample, snr, training_loss_terms,
    training_losses)
from diffusion_jax.process.respacing import respace, space_timesteps
from diffusion_jax.process.schedules import get_beta_schedule, rescale_zero_terminal_snr
from diffusion_jax.sampling.config import SamplerConfig
from diffusion_jax.sampling.sampler import encode, sample
from diffusion_jax.sampling.solvers import (
    SOLVERS, StepSchedule, level_schedule, solve, step_schedule)

__version__ = '0.1.0'
