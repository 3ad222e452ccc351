"""Embedded synthetic text-to-image data: one filled shape on a plain background.

Every image shows a single shape described by a :class:`~lit_dimba.scenes.Scene` (colour, shape,
position on a 3x3 grid, size) on a fixed light-grey background, with a natural-language caption
such as "a small red circle in the top left corner". The world itself (vocabulary, drawing,
wording, reading back) lives in ``lit_dimba.scenes``; this module makes data sets of it: the
train/val streams, the held-out combinations and their test prompts. Images are rendered at any
resolution, so the data set needs no files and no downloads.

All randomness comes from ``random.Random`` instances. Dataset items use one seeded from a
stable hash of ``(seed, split, index)``, so every sample is a pure function of those and the
resolution; jitter is drawn as a fraction of the image, so the same item at two resolutions
shows the same scene, jitter and caption.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from datamodules.caption_image import CaptionImageSource
from lit_dimba.errors import ConfigError
from lit_dimba.scenes import ATTRIBUTES, Scene, all_scenes, caption, render
from lit_dimba.scenes.render import image_size


def heldout_scenes(fraction: float = 0.1, seed: int = 0) -> list[Scene]:
    """A deterministic set of scene combinations kept out of training and validation.

    Combinations are visited in an order shuffled by ``seed`` and held out one by one, skipping
    any whose removal would leave some colour, shape, position or size without a training
    combination, until ``round(fraction * 324)`` are held out.

    Raises:
        ValueError: if ``fraction`` is outside [0, 1) or that many cannot be held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction!r}")
    order = all_scenes()
    target = round(fraction * len(order))
    # How many training combinations still show each (field, value) pair.
    remaining = Counter(item for scene in order for item in vars(scene).items())
    random.Random(seed).shuffle(order)
    heldout = []
    for scene in order:
        if len(heldout) == target:
            break
        if all(remaining[item] > 1 for item in vars(scene).items()):
            heldout.append(scene)
            for item in vars(scene).items():
                remaining[item] -= 1
    if len(heldout) < target:
        raise ValueError(
            f"heldout fraction {fraction} is too large: only {len(heldout)} of {target} combinations "
            "can be held out while every colour, shape, position and size keeps a training combination"
        )
    return heldout


def _item_rng(seed: int, stream: str, index: int) -> random.Random:
    """A ``random.Random`` seeded from a stable (unsalted) hash of ``(seed, stream, index)``."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class SyntheticShapes(Dataset):
    """Endless-style synthetic data set of ``length`` captioned shape images.

    Item ``i`` draws a scene uniformly from the combinations not returned by
    ``heldout_scenes(heldout_fraction)``, renders it and captions it, using an RNG seeded from
    ``(seed, split, i)``; "train" and "val" are two independent streams over the same combinations.
    The held-out set does not depend on ``seed``, so data sets built with different seeds agree
    on what is held out.

    ``resolution`` may be reassigned after construction (e.g. by a progressive-resolution
    callback); items read it when they are fetched.

    Items: ``{"image": Tensor [3, H, W] float32 in [-1, 1], "caption": str}``.
    """

    def __init__(
        self,
        length: int,
        resolution: int | tuple[int, int] = 32,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.1,
    ):
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.length = length
        self.resolution = resolution
        self.seed = seed
        self.split = split
        heldout = set(heldout_scenes(heldout_fraction))
        self.scenes = [scene for scene in all_scenes() if scene not in heldout]

    @property
    def resolution(self) -> int | tuple[int, int]:
        """Image side, or (height, width), of the items returned from now on."""
        return self._resolution

    @resolution.setter
    def resolution(self, value: int | tuple[int, int]) -> None:
        image_size(value)
        self._resolution = value

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, tuple[int, int]]) -> dict[str, torch.Tensor | str]:
        """Item ``key`` at ``resolution``, or ``(index, (height, width))`` at that size (resolution curriculum)."""
        index, size = key if isinstance(key, tuple) else (key, self.resolution)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {self.length}")
        rng = _item_rng(self.seed, self.split, index)
        scene = rng.choice(self.scenes)
        image = render(scene, size, rng)
        return {"image": image, "caption": caption(scene, rng)}


class HeldOutPrompts(Dataset):
    """Captions of held-out scenes, for generating images and scoring prompt following.

    Prompt ``i`` shows ``heldout_scenes(heldout_fraction)[i % n]``, with a caption phrased by an
    RNG seeded from ``(seed, i)``. ``scenes`` holds the :class:`Scene` of each prompt.

    Items: ``{"caption", "colour", "shape", "position", "size"}``, all ``str`` (so the default
    collate function yields lists of strings).
    """

    def __init__(self, num_prompts: int = 64, seed: int = 0, heldout_fraction: float = 0.1):
        if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts <= 0:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        heldout = heldout_scenes(heldout_fraction)
        if not heldout:
            raise ValueError(f"heldout_fraction {heldout_fraction} holds out no scene combination")
        self.scenes = [heldout[i % len(heldout)] for i in range(num_prompts)]
        self.captions = [caption(scene, _item_rng(seed, "heldout", i)) for i, scene in enumerate(self.scenes)]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, str]:
        scene = self.scenes[index]
        return {"caption": self.captions[index], **vars(scene)}


class SyntheticShapesSource(CaptionImageSource):
    """The embedded default source for ``CaptionImageDataModule``: synthetic shapes, no download.

    Args:
        num_train, num_val: lengths of the train and val streams (items are generated on the fly).
        seed: seeds both streams and the caption wording of the held-out prompts.
        heldout_fraction: share of scene combinations kept out of train/val and used as test prompts.
        num_test_prompts: number of held-out prompts scored by ``test``.
        keep: train on a curated subset only: scene attribute -> allowed values, e.g. ``{size: [large]}``
            (validation and test prompts are unchanged).
    """

    def __init__(self, num_train: int = 1_000_000, num_val: int = 256, seed: int = 0,
                 heldout_fraction: float = 0.1, num_test_prompts: int = 64, keep: dict[str, list[str]] | None = None):
        unknown = sorted(set(keep or {}) - set(ATTRIBUTES))
        if unknown:
            raise ConfigError(f"data.source.keep has unknown attributes {unknown}; use {list(ATTRIBUTES)}")
        self.keep = keep
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.num_test_prompts = num_test_prompts

    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> SyntheticShapes:
        if buckets:
            raise ConfigError("the synthetic source renders square images only; set data.buckets: false")
        dataset = SyntheticShapes(self.num_train, resolution, self.seed, "train", self.heldout_fraction)
        if self.keep:
            dataset.scenes = [s for s in dataset.scenes if all(getattr(s, k) in v for k, v in self.keep.items())]
            if not dataset.scenes:
                raise ConfigError(f"data.source.keep={self.keep} leaves no training scene; allow more values")
        return dataset

    def val_dataset(self, resolution: int) -> SyntheticShapes:
        return SyntheticShapes(self.num_val, resolution, self.seed, "val", self.heldout_fraction)

    def test_prompts(self) -> list[dict[str, str]]:
        prompts = HeldOutPrompts(self.num_test_prompts, self.seed, self.heldout_fraction)
        return [prompts[i] for i in range(len(prompts))]
