"""Prompt-following score during training, so that ``ModelCheckpoint`` can keep the best checkpoint by it."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_dimba.eval.prompt_following import PromptFollowingScore, batch_scenes, scored


class PromptFollowing(Callback):
    """After each validation, generates the data source's held-out test prompts (the first ``num_prompts``) with
    the model's sampling settings (EMA weights when the ``EMA`` callback swaps them in) and logs the share of
    images right in each attribute, ``val/prompt_following/{colour,shape,position,size,all}``, or in the
    compositional world the share followed per task and their mean, ``val/prompt_following/{single_object,
    two_object,counting,colors,position,color_attr,overall}`` (only the tasks of the source). The prompts are
    split over ranks and scored by one ``PromptFollowingScore``, which sums the ranks' counts, so every rank logs
    the same value. Monitor one in ``ModelCheckpoint`` (``monitor: val/prompt_following/all``, ``mode: max``) to
    keep the best checkpoint. Needs prompts with scene attributes or requests (the synthetic source); with others
    it logs nothing.

    Args:
        num_prompts: prompts generated per validation.
        batch_size: prompts per generation batch.
    """

    def __init__(self, num_prompts: int = 64, batch_size: int = 32):
        self.num_prompts = num_prompts
        self.batch_size = batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.require_text_encoder("callbacks.PromptFollowing generates images from prompts")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        # this rank's share, padded so that every rank generates as many batches (under FSDP each sampling step is a
        # collective); the padding is generated but not scored
        loader = datamodule.prompt_loader(datamodule.source.test_prompts()[: self.num_prompts], self.batch_size)
        score = PromptFollowingScore().to(pl_module.device)
        for batch in loader:
            scenes = batch_scenes(batch)
            if scenes is None:
                return
            keep = scored(batch)
            images = pl_module.generate_batch(batch)[torch.tensor(keep)]
            score.update(images, [scene for scene, kept in zip(scenes, keep) if kept])
        for key, value in score.compute().items():
            pl_module.log(f"val/prompt_following/{key}", value)
