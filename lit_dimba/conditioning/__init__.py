"""Frozen conditioning models: text encoders and VAEs (or the pixel-space identity)."""

from lit_dimba.conditioning.text import TextEncoder, TinyT5TextEncoder
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace

__all__ = ["LatentVAE", "PixelSpace", "TextEncoder", "TinyT5TextEncoder"]
