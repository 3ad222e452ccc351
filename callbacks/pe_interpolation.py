"""Interpolates the backbone's positional embedding across training resolutions (PixArt's convention)."""

import math

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_dimba.errors import ConfigError


class PEInterpolation(Callback):
    """PE interpolation across resolutions (PixArt-alpha, Dimba): a larger grid's positions are squeezed into the
    range the model learned at ``base_resolution`` instead of stepping one per token into positions it never saw.

    At setup (before fit, validate, test and predict) it hands the backbone its base, once (every backbone of the
    module: in distillation the teacher's too, so teacher and student embed the same positions): ``pe_base_grid`` =
    ``base_resolution`` / (VAE factor x patch), the token grid side at which the PE scale is 1. Every forward then
    computes its PE from its own input's token grid (``Backbone.pe_scale``): ``pe_interpolation = sqrt(h * w) /
    pe_base_grid`` with positions stepping by ``1 / pe_interpolation`` per token on both axes, i.e. 512^2 -> 1,
    1024^2 -> 2, 2048^2 -> 4 with ``base_resolution: 512``, as PixArt-alpha's 1024 and 2048 models, and every
    resolution spans the positions of the base one (an aspect bucket is scaled by the side of the square of its
    area). So a resolution curriculum, validation at ``data.resolution`` and sampling at any size need nothing more
    from this callback, and the base is saved in the checkpoint's ``backbone_config`` (exports interpolate too).
    Without the callback (or with ``interpolate: false``) the PE stays as configured: with the default
    ``base_size: null`` a new resolution extrapolates (one step per token).

    Args:
        base_resolution: the pixel resolution at which ``pe_interpolation`` is 1.
        mode: also set the backbone's ``pe_mode`` ("pixart", or "centred": centred and normalised by the long
            edge, for zero-shot higher resolutions and other aspect ratios); None keeps it.
        interpolate: False keeps the PE as configured (the extrapolation ablation; ``mode`` and the logging still
            apply).

    Logs ``data/resolution`` (the side of the square of the batch's image area) and ``pe/interpolation`` (the scale
    of the batch's grid) in training, both from the batch's shape.
    """

    def __init__(self, base_resolution: int = 512, mode: str | None = None, interpolate: bool = True):
        if mode not in (None, "pixart", "centred"):
            raise ConfigError(f"PEInterpolation mode={mode!r}; choose 'pixart', 'centred' or null")
        self.base_resolution = base_resolution
        self.mode = mode
        self.interpolate = interpolate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.check_resolution(self.base_resolution, "PEInterpolation.base_resolution")
        for backbone in pl_module.backbones():  # a distillation's teacher sees the positions its student sees
            if self.interpolate:
                backbone.pe_base_grid = self.base_resolution // pl_module.token_stride
            if self.mode is not None:
                backbone.pe_mode = self.mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        height, width = pl_module.batch_encoders.image_size(batch)
        stride = pl_module.token_stride
        pl_module.log("data/resolution", math.sqrt(height * width), on_step=True, on_epoch=False)
        pl_module.log("pe/interpolation", pl_module.model.pe_scale((height // stride, width // stride)),
                      on_step=True, on_epoch=False)
