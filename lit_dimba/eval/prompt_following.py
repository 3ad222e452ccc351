"""Prompt-following score: check generated images against the scenes their prompts described.

Each image is read back by ``lit_dimba.scenes.read_scene`` and compared with its scene, attribute by attribute.
"""

from __future__ import annotations

import torch

from lit_dimba.scenes import ATTRIBUTES, Scene, read_scene


def judge(images: torch.Tensor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Check each image against the scene its prompt described.

    Args:
        images: Tensor [B, 3, H, W], float in [-1, 1].
        scenes: B scenes, one per image.

    Returns:
        Bool tensors [B] under "colour", "shape", "position", "size", and "all"
        (colour, shape and position all correct; size is reported but not required).
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


def summarise(correct: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction correct per key of a ``judge`` result."""
    return {key: value.float().mean().item() for key, value in correct.items()}
