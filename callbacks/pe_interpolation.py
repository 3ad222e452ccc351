"""Keeps the backbone's positional embedding in step with the training resolution (PixArt's convention)."""

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_dimba.errors import ConfigError


class PEInterpolation(Callback):
    """Sets ``pe_interpolation = resolution / base_resolution`` and ``base_size`` = the token grid at that
    resolution, from the DataModule's current ``resolution``, before training, validation, test and predict and
    whenever the resolution changes (a resolution curriculum). So 512^2 -> 1, 1024^2 -> 2, 2048^2 -> 4 with
    ``base_resolution: 512``, as PixArt-alpha does, and every resolution spans the positions of the base one.
    Removing the callback from the YAML keeps the PE as configured (an ablation).

    Args:
        base_resolution: the pixel resolution at which ``pe_interpolation`` is 1.
        mode: also switch the backbone's ``pe_mode`` ("pixart", or "centred": centred and normalised by the long
            edge, for zero-shot higher resolutions and other aspect ratios); None keeps it.

    Logs ``data/resolution`` and ``pe/interpolation`` in training.
    """

    def __init__(self, base_resolution: int = 512, mode: str | None = None):
        if mode not in (None, "pixart", "centred"):
            raise ConfigError(f"PEInterpolation mode={mode!r}; choose 'pixart', 'centred' or null")
        self.base_resolution = base_resolution
        self.mode = mode
        self._resolution = None

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolution = getattr(trainer.datamodule, "resolution", None) if trainer.datamodule else None
        if resolution is None or resolution == self._resolution:
            return
        pl_module.check_resolution(resolution, "data.resolution")
        pl_module.check_resolution(self.base_resolution, "PEInterpolation.base_resolution")
        model = pl_module.model
        model.base_size = resolution // pl_module.token_stride
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
