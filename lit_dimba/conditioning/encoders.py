"""What turns a training batch into the backbone's inputs: latents, text features and their mask.

``DiffusionModule`` calls one ``BatchEncoders`` object on every training and validation batch and never looks at
the batch's keys itself. ``FrozenEncoders`` runs the frozen text encoder and VAE on captions and images; a data
source whose batches are already encoded supplies its own object with the same interface
(``datamodules.cache.CachedEncoders`` for the feature cache).
"""

from typing import Protocol

import torch
from torch import Tensor

from lit_dimba.conditioning.text import TextEncoder
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace
from lit_dimba.errors import ConfigError


class BatchEncoders(Protocol):
    """The interface: a training batch -> (latents (B, C, h, w), text features (B, L, D), mask (B, L) bool)."""

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's latents, text features and mask; a posterior sample, if the VAE takes one, from
        ``generator``."""

    def image_size(self, batch: dict) -> tuple[int, int]:
        """(height, width) in pixels of the batch's images, from its tensors' shapes."""


class FrozenEncoders:
    """Encodes batches ``{"image": (B, 3, H, W) in [-1, 1], "caption": list[str]}`` with the frozen models.

    Holds references to the module's ``text_encoder`` and ``vae`` (it is not a module: their weights are
    registered once, on the LightningModule).
    """

    def __init__(self, text_encoder: TextEncoder, vae: LatentVAE | PixelSpace):
        self.text_encoder = text_encoder
        self.vae = vae

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Latents (B, C, H / f, W / f) by ``vae.encode`` (its posterior sample, if any, from ``generator``),
        features (B, L, D) and mask (B, L) by the text encoder."""
        if self.text_encoder is None:
            raise ConfigError("model.text_encoder is null but the batches carry captions, not cached features; set "
                              "model.init_args.text_encoder, or train on a feature cache (datamodules.cache)")
        latents = self.vae.encode(batch["image"], generator)
        features, mask = self.text_encoder(batch["caption"])
        return latents, features, mask

    def image_size(self, batch: dict) -> tuple[int, int]:
        height, width = batch["image"].shape[-2:]
        return height, width
