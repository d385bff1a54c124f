"""Denoising networks. ``UNet`` is the DDPM U-Net; ``UNetConfig`` describes one at the boundary."""

from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "timestep_embedding"]
