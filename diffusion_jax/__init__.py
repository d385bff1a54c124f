"""diffusion_jax: denoising diffusion probabilistic models (Ho et al. 2020) in JAX.

The DDPM mathematics lives in pure, jit/vmap/grad-safe functions: `schedules` (β schedules),
`gaussian_diffusion` (forward process, posterior, model distribution, losses, bits/dim),
`samplers` (ancestral, respaced and DDIM sampling) and `timestep_sampler` (importance
sampling of t). Their public names are importable from the package itself.
"""

from diffusion_jax.process.gaussian_diffusion import (
    GaussianDiffusion, LossType, MeanType, Parameterization, VarType, calc_bpd_loop,
    discretized_gaussian_log_likelihood, get_v, mean_flat, min_snr_weight, normal_kl,
    p_mean_variance, predict_noise_from_start, predict_start_from_noise, predict_start_from_v,
    prior_bpd, q_mean_variance, q_posterior_mean_variance, q_sample, snr, training_loss_terms,
    training_losses)
from diffusion_jax.sampling.samplers import (
    ddim_reverse_sample_loop, ddim_sample_loop, p_sample, p_sample_loop,
    p_sample_loop_progressive, respace, space_timesteps)
from diffusion_jax.process.schedules import get_beta_schedule, rescale_zero_terminal_snr

__version__ = '0.1.0'
