"""Progressive / mixed-resolution training: Dimba's 256 -> 512 -> 1024, T2MD's 512 -> mixed 512/1024 -> 2048."""

import math

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.curriculum import ResolutionSchedule, Stage
from lit_dimba.errors import ConfigError


class ResolutionCurriculum(Callback):
    """Trains each step at the resolution and batch size its stage gives (see ``datamodules.curriculum``).

    In YAML::

        - class_path: callbacks.ResolutionCurriculum
          init_args:
            stages:
              - {until_step: 10000, resolutions: {512: 1.0}, batch_size: 64}
              - {until_step: 50000, resolutions: {512: 0.2, 1024: 0.8}, batch_size: 16}   # mixed: drawn per batch
              - {until_step: 70000, resolutions: {2048: 1.0}, batch_size: 4}

    At setup it hands the schedule to the DataModule, once, before the training loader is built. The loader's batch
    sampler (``CurriculumBatchSampler``) then gives each step the resolution and batch size of its stage by the
    step's position, so stage switches happen at exactly ``until_step``; stage and draws are functions of the step
    and the loader's position is checkpointed, so ``--ckpt_path`` resumes inside a stage with the same sequence.
    Nothing flows back: the model takes each batch's resolution from the batch's shape (its PE: ``PEInterpolation``),
    and validation, test and predict run at ``data.resolution``, which the curriculum leaves as it is. With
    ``data.buckets`` each batch is one aspect bucket of the table at its resolution. Logs ``curriculum/stage`` and
    ``curriculum/resolution`` (the side of the square of the batch's image area). Needs ``trainer.max_steps``, a
    map-style source, ``accumulate_grad_batches: 1``, and with several devices
    ``trainer.use_distributed_sampler: false``.
    """

    def __init__(self, stages: list[Stage], seed: int = 0):
        self.stages = stages
        self.seed = seed
        self.schedule: ResolutionSchedule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "schedule"):
            raise ConfigError("ResolutionCurriculum needs data: a datamodules.CaptionImageDataModule")
        self.schedule = ResolutionSchedule(self.stages, datamodule.batch_size, self.seed)
        for resolution in self.schedule.resolutions():
            pl_module.check_resolution(resolution, "ResolutionCurriculum stage resolution")
        if stage == "fit":
            if trainer.max_steps is None or trainer.max_steps < 0:
                raise ConfigError("ResolutionCurriculum needs trainer.max_steps (the stages are counted in steps)")
            if trainer.accumulate_grad_batches != 1:
                raise ConfigError("ResolutionCurriculum counts one batch per optimizer step; set "
                                  "trainer.accumulate_grad_batches: 1 (raise the stage batch sizes instead)")
            if trainer.max_steps > self.stages[-1].until_step:
                rank_zero_warn(f"trainer.max_steps={trainer.max_steps} is past the last stage's until_step; the last "
                               "stage continues to the end")
            datamodule.schedule = self.schedule

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        height, width = pl_module.batch_encoders.image_size(batch)
        pl_module.log("curriculum/stage", float(self.schedule.stage_index(trainer.global_step)), on_step=True,
                      on_epoch=False)
        pl_module.log("curriculum/resolution", math.sqrt(height * width), on_step=True, on_epoch=False)
