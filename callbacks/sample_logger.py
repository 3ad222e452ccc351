"""Logs a grid of generated images for fixed prompts to TensorBoard every N training steps."""

import lightning as L
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid

from callbacks.ema import EMA


class SampleLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 samples ``prompts`` (EMA weights when an ``EMA``
    callback is present) at the data resolution and logs the grid as image ``samples`` to the logger.

    Every rank samples (under FSDP the sampling forward passes gather shards, so all ranks must run them; under
    DDP nothing waits on rank 0); only rank 0's logger writes. Settings (sampler, steps, CFG scale, seed) come from the
    module's ``sampling``.
    """

    def __init__(self, prompts: list[str], every_n_steps: int = 1000, nrow: int = 4):
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.nrow = nrow

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.require_text_encoder("callbacks.SampleLogger generates images from prompts")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps:
            return
        experiment = getattr(trainer.logger, "experiment", None)  # a no-op stand-in on ranks other than 0
        if not hasattr(experiment, "add_image"):
            return
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
        resolution = trainer.datamodule.resolution
        was_training = pl_module.training
        pl_module.eval()
        try:
            if ema is not None:
                with ema.averaged(pl_module):
                    images = pl_module.generate(self.prompts, resolution, resolution)
            else:
                images = pl_module.generate(self.prompts, resolution, resolution)
        finally:
            pl_module.train(was_training)
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=self.nrow, padding=2, pad_value=1.0)
        experiment.add_image("samples", grid.clamp(0, 1), step)
        experiment.add_text("samples/prompts", "\n\n".join(f"{i}. {p}" for i, p in enumerate(self.prompts)), step)
