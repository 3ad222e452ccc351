"""Prompt-following score during training, so that ``ModelCheckpoint`` can keep the best checkpoint by it."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from datamodules.caption_image import PromptSet
from lit_dimba.modules.diffusion import SCORED_ATTRIBUTES


class PromptFollowing(Callback):
    """After each validation, generates the data source's held-out test prompts (the first ``num_prompts``) with
    the model's sampling settings (EMA weights when the ``EMA`` callback swaps them in) and logs the share of
    images right in each attribute: ``val/prompt_following/{colour,shape,position,size,all}``. The prompts are
    split over ranks and the counts summed, so every rank logs the same value. Monitor one in ``ModelCheckpoint``
    (``monitor: val/prompt_following/all``, ``mode: max``) to keep the best checkpoint. Needs prompts with scene
    attributes (the synthetic source); with others it logs nothing.

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
        prompts = PromptSet(datamodule.source.test_prompts()[: self.num_prompts], datamodule.resolution)
        # every rank generates the same number of batches (under FSDP each sampling step is a collective): the
        # shares are padded with repeats of the first prompt, which are not counted
        share = list(range(trainer.global_rank, len(prompts), trainer.world_size))
        padded = share + [0] * (-(-len(prompts) // trainer.world_size) - len(share))
        counted = torch.tensor([1.0] * len(share) + [0.0] * (len(padded) - len(share)), device=pl_module.device)
        loader = DataLoader(torch.utils.data.Subset(prompts, padded), batch_size=self.batch_size)
        correct = torch.zeros(len(SCORED_ATTRIBUTES), device=pl_module.device)
        count = torch.zeros((), device=pl_module.device)
        for i, batch in enumerate(loader):
            judged = pl_module.judge_batch(batch, pl_module.generate_batch(batch))
            if not judged:
                return
            weight = counted[i * self.batch_size: (i + 1) * self.batch_size]
            correct += torch.stack([(judged[k].to(weight) * weight).sum() for k in SCORED_ATTRIBUTES])
            count += weight.sum()
        correct = trainer.strategy.reduce(correct, reduce_op="sum")
        count = trainer.strategy.reduce(count, reduce_op="sum")
        for key, value in zip(SCORED_ATTRIBUTES, correct / count.clamp(min=1)):
            pl_module.log(f"val/prompt_following/{key}", value)
