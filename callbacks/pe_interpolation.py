"""Interpolates the backbone's positional embedding across training resolutions (PixArt's convention)."""

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_dimba.errors import ConfigError


class PEInterpolation(Callback):
    """PE interpolation across resolutions (PixArt-alpha, Dimba): a larger grid's positions are squeezed into the
    range the model learned at ``base_resolution`` instead of stepping one per token into positions it never saw.

    Before training, validation, test and predict and whenever the data resolution changes (a resolution
    curriculum), it sets the backbone's ``base_size`` to None (positions step by ``1 / pe_interpolation`` per token on
    both axes, also for aspect buckets) and ``pe_interpolation = resolution / base_resolution``: 512^2 -> 1,
    1024^2 -> 2, 2048^2 -> 4 with ``base_resolution: 512``, as PixArt-alpha's 1024 and 2048 models, and every
    resolution spans the positions of the base one. Without the callback (or with ``interpolate: false``) the PE
    stays as configured: with the default ``base_size: null`` a new resolution extrapolates (one step per token).

    Args:
        base_resolution: the pixel resolution at which ``pe_interpolation`` is 1.
        mode: also switch the backbone's ``pe_mode`` ("pixart", or "centred": centred and normalised by the long
            edge, for zero-shot higher resolutions and other aspect ratios); None keeps it.
        interpolate: False keeps ``pe_interpolation`` as configured (the extrapolation ablation; ``mode`` and the
            logging still apply).

    Logs ``data/resolution`` and ``pe/interpolation`` in training.
    """

    def __init__(self, base_resolution: int = 512, mode: str | None = None, interpolate: bool = True):
        if mode not in (None, "pixart", "centred"):
            raise ConfigError(f"PEInterpolation mode={mode!r}; choose 'pixart', 'centred' or null")
        self.base_resolution = base_resolution
        self.mode = mode
        self.interpolate = interpolate
        self._resolution = None

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolution = getattr(trainer.datamodule, "resolution", None) if trainer.datamodule else None
        if resolution is None or resolution == self._resolution:
            return
        pl_module.check_resolution(resolution, "data.resolution")
        pl_module.check_resolution(self.base_resolution, "PEInterpolation.base_resolution")
        model = pl_module.model
        if self.interpolate:
            model.base_size = None
            model.pe_interpolation = resolution / self.base_resolution
        if self.mode is not None:
            model.pe_mode = self.mode
        self._resolution = resolution

    def on_fit_start(self, trainer, pl_module):
        self._update(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._update(trainer, pl_module)
        pl_module.log("data/resolution", float(self._resolution or 0), on_step=True, on_epoch=False)
        pl_module.log("pe/interpolation", float(pl_module.model.pe_interpolation), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer, pl_module):
        self._update(trainer, pl_module)

    def on_test_start(self, trainer, pl_module):
        self._update(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._update(trainer, pl_module)
