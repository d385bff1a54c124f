"""diffusion_jax: denoising diffusion probabilistic models in JAX.

The DDPM mathematics (Ho et al. 2020) lives in pure, jit/vmap/grad-safe functions:
``schedules`` (beta schedules), ``gaussian_diffusion`` (forward process, posterior, model
distribution, losses, bits/dim) and ``samplers`` (ancestral, respaced and DDIM sampling).
"""
