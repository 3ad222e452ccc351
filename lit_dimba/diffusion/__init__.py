"""Noise schedule, training losses and CFG sampling through diffusers schedulers."""

from lit_dimba.diffusion.gaussian import GaussianDiffusion, Noised

__all__ = ["GaussianDiffusion", "Noised"]
