"""The prompt-following score: how many generated images show what their prompt's scene asked for.

``judge`` reads each image back (``lit_dimba.scenes.read_scene``) and compares it with its scene, attribute by
attribute. ``PromptFollowingScore`` sums those checks over batches as a ``torchmetrics.Metric``: its states are
counts, so under DDP/FSDP ``compute`` adds every rank's counts by itself and every rank gets the same score.
``DiffusionModule.test_step`` and the ``PromptFollowing`` callback both use it.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lit_dimba.scenes import ATTRIBUTES, Scene, read_scene

# The scores, in the order they are reported: each attribute, then "all" (colour, shape and position all right;
# size is reported but not required).
SCORES: tuple[str, ...] = (*ATTRIBUTES, "all")


def judge(images: torch.Tensor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Check each image against the scene its prompt described.

    Args:
        images: Tensor [B, 3, H, W], float in [-1, 1].
        scenes: B scenes, one per image.

    Returns:
        Bool tensors [B] under each key of ``SCORES``.
    """
    if images.ndim != 4 or len(images) != len(scenes):
        raise ValueError(
            f"need images [B, 3, H, W] and B scenes, got {tuple(images.shape)} and {len(scenes)} scenes"
        )
    readings = [read_scene(image) for image in images]
    correct = {
        key: torch.tensor([reading[key] == getattr(scene, key) for reading, scene in zip(readings, scenes)],
                          dtype=torch.bool)
        for key in ATTRIBUTES
    }
    correct["all"] = correct["colour"] & correct["shape"] & correct["position"]
    return correct


def batch_scenes(batch: dict) -> list[Scene] | None:
    """The scenes of a collated batch of prompts (``{"caption": [B], "colour": [B], ...}``), or None when the
    prompts carry no scene attributes (prompts of other data than the synthetic source's)."""
    if not all(key in batch for key in ATTRIBUTES):
        return None
    return [Scene(*values) for values in zip(*(batch[key] for key in ATTRIBUTES))]


class PromptFollowingScore(Metric):
    """Share of images right in each attribute of their scene, and in all of colour, shape and position.

    States (summed over updates, and over ranks by ``compute``): ``correct`` [len(SCORES)] int64, the number of
    images right in each score; ``total`` [] int64, the number of images judged. Integer counts keep the sums
    exact and are left alone when the module holding the metric is cast to bf16.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(len(SCORES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, scenes: list[Scene]) -> None:
        """Judge images [B, 3, H, W] in [-1, 1] against their B scenes (B may be 0)."""
        correct = judge(images, scenes)
        self.correct += torch.stack([correct[key].sum() for key in SCORES]).to(self.correct)
        self.total += len(scenes)

    def compute(self) -> dict[str, torch.Tensor]:
        """Fraction right under each key of ``SCORES`` (float32 scalars); empty when no image was judged."""
        if self.total == 0:
            return {}
        fractions = self.correct.float() / self.total
        return dict(zip(SCORES, fractions))
