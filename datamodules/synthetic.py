"""Embedded synthetic text-to-image data, in one of two worlds of ``lit_dimba.scenes``:

- ``one_object`` (the default): every image shows a single shape described by a
  :class:`~lit_dimba.scenes.Scene` (colour, shape, position on a 3x3 grid, size) on a fixed light-grey
  background, with a natural-language caption such as "a small red circle in the top left corner";
- ``compositional``: every image shows 1 to 4 objects asked for by a
  :class:`~lit_dimba.scenes.composition.Request` of one of GenEval's six task types, with a caption such as
  "a yellow circle to the left of a blue square" or "three green triangles".

The worlds themselves (vocabulary, drawing, wording, reading back) live in ``lit_dimba.scenes``; this module makes
data sets of them: the train/val streams, the held-out combinations and their test prompts. Images are rendered at
any resolution, so the data set needs no files and no downloads.

All randomness comes from ``random.Random`` instances. Dataset items use one seeded from a
stable hash of ``(seed, split, index)``, so every sample is a pure function of those and the
resolution; positions are drawn as fractions of the image (one_object) or of its shorter side (compositional),
so the same item at two resolutions (of one aspect ratio) shows the same picture and caption.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import torch
from torch.utils.data import Dataset

from datamodules.caption_image import CaptionImageSource
from lit_dimba.errors import ConfigError
from lit_dimba.scenes import ATTRIBUTES, Scene, all_scenes, caption, render
from lit_dimba.scenes.composition import MAX_COUNT, TASKS, Request, all_requests
from lit_dimba.scenes.draw import draw
from lit_dimba.scenes.layout import GAP, MARGIN, OBJECT_SIZE, fits, lay_out
from lit_dimba.scenes.phrasing import describe, plain
from lit_dimba.scenes.render import image_size


def _hold_out(candidates: list, values, target: int, seed: int) -> list:
    """Greedy hold-out: ``candidates`` in an order shuffled by ``seed``, each held out unless that would leave one
    of its ``values(candidate)`` (distinct items) without a training candidate, until ``target`` are held out.
    Returns the held-out candidates in visiting order (fewer than ``target`` when no more can go)."""
    order = list(candidates)
    remaining = Counter(value for candidate in order for value in values(candidate))  # training candidates per value
    random.Random(seed).shuffle(order)
    heldout = []
    for candidate in order:
        if len(heldout) == target:
            break
        if all(remaining[value] > 1 for value in values(candidate)):
            heldout.append(candidate)
            remaining.subtract(values(candidate))
    return heldout


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
    scenes = all_scenes()
    target = round(fraction * len(scenes))
    heldout = _hold_out(scenes, lambda scene: vars(scene).items(), target, seed)
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


class _CaptionedImages(Dataset):
    """What both synthetic data sets share: ``length`` items of a "train" or "val" stream, each a pure function of
    ``(seed, split, index)`` and the image size. Subclasses draw one item in ``item(rng, size)``.

    ``resolution`` may be reassigned after construction; items read it when they are fetched.
    """

    def __init__(self, length: int, resolution: int | tuple[int, int], seed: int, split: str):
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.length = length
        self.resolution = resolution
        self.seed = seed
        self.split = split

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
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {self.length}")
        return self.item(_item_rng(self.seed, self.split, index), size)

    def item(self, rng: random.Random, size: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        """One item drawn with ``rng`` at image size ``size``: ``{"image": Tensor [3, H, W], "caption": str}``."""
        raise NotImplementedError


class SyntheticShapes(_CaptionedImages):
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
        super().__init__(length, resolution, seed, split)
        heldout = set(heldout_scenes(heldout_fraction))
        self.scenes = [scene for scene in all_scenes() if scene not in heldout]

    def item(self, rng: random.Random, size: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
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


def heldout_requests(task: str, fraction: float = 0.1, seed: int = 0) -> list[Request]:
    """A deterministic set of the requests of ``task`` kept out of training and validation.

    The pictures that the task's requests ask for (``Request.key``: "A left of B" and "B right of A" are one) are
    visited in an order shuffled by ``seed`` and held out one by one, skipping any whose removal would leave some
    colour, shape, count or relation of the task without a training picture, until ``round(fraction * number of
    pictures)`` are held out. Tasks that ask for the same pictures (single_object and colors, two_object and
    color_attr) hold out the same ones.

    Returns:
        Every request of ``task`` whose picture is held out, in an order shuffled by ``seed``.

    Raises:
        ValueError: if ``fraction`` is outside [0, 1) or that many cannot be held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction!r}")
    requests = all_requests(task)
    keys = list(dict.fromkeys(request.key for request in requests))
    target = round(fraction * len(keys))

    def values(key: tuple) -> set[tuple[str, object]]:
        things, count, relation = key
        return {("count", count), ("relation", relation), *(("colour", thing.colour) for thing in things),
                *(("shape", thing.shape) for thing in things)}

    heldout = set(_hold_out(keys, values, target, seed))
    if len(heldout) < target:
        raise ValueError(f"heldout fraction {fraction} is too large for {task}: only {len(heldout)} of {target} "
                         "pictures can be held out while every colour, shape, count and relation keeps one")
    heldout_requests = [request for request in requests if request.key in heldout]
    random.Random(seed).shuffle(heldout_requests)  # so that the first test prompts of a task are a fair sample
    return heldout_requests


class SyntheticCompositions(_CaptionedImages):
    """Endless-style synthetic data set of ``length`` captioned images of the compositional world.

    Item ``i`` draws a task uniformly from ``tasks``, then a request uniformly from that task's requests not
    returned by ``heldout_requests(task, heldout_fraction)``, lays it out (``lay_out``, in the aspect ratio of the
    image), draws it and captions it in random words, using an RNG seeded from ``(seed, split, i)``. "train" and
    "val" are two independent streams over the same requests.

    ``resolution`` may be reassigned after construction; items read it when they are fetched.

    Items: ``{"image": Tensor [3, H, W] float32 in [-1, 1], "caption": str}``.
    """

    def __init__(self, length: int, resolution: int | tuple[int, int] = 64, seed: int = 0, split: str = "train",
                 heldout_fraction: float = 0.1, tasks: tuple[str, ...] = TASKS,
                 object_size: tuple[float, float] = OBJECT_SIZE):
        super().__init__(length, resolution, seed, split)
        self.tasks = tuple(tasks)
        self.object_size = tuple(object_size)
        self.requests = {}
        for task in self.tasks:
            heldout = set(heldout_requests(task, heldout_fraction))
            self.requests[task] = [request for request in all_requests(task) if request not in heldout]

    def item(self, rng: random.Random, size: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        height, width = image_size(size)
        request = rng.choice(self.requests[rng.choice(self.tasks)])
        layout = lay_out(request, width / min(height, width), height / min(height, width), rng, self.object_size)
        return {"image": draw(layout, (height, width)), "caption": describe(request, rng)}


class HeldOutRequests(Dataset):
    """Captions of held-out requests, for generating images and scoring prompt following per task.

    Prompt ``i`` is of task ``tasks[i % len(tasks)]``, so the tasks take turns, and asks for the next of that
    task's ``heldout_requests`` (cycling), in words picked by an RNG seeded from ``(seed, i)``. ``requests`` holds
    the :class:`Request` of each prompt.

    Items: ``{"caption", "task", "request"}``, all ``str`` (``request`` in the plain words of ``phrasing.plain``,
    which ``lit_dimba.eval.prompt_following.batch_scenes`` reads back).
    """

    def __init__(self, num_prompts: int = 60, seed: int = 0, heldout_fraction: float = 0.1,
                 tasks: tuple[str, ...] = TASKS):
        if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts <= 0:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        heldout = {task: heldout_requests(task, heldout_fraction) for task in tasks}
        empty = [task for task, requests in heldout.items() if not requests]
        if empty:
            raise ValueError(f"heldout_fraction {heldout_fraction} holds out no request of {empty}")
        self.requests = [heldout[tasks[i % len(tasks)]][i // len(tasks) % len(heldout[tasks[i % len(tasks)]])]
                         for i in range(num_prompts)]
        self.captions = [describe(request, _item_rng(seed, "heldout", i)) for i, request in enumerate(self.requests)]

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict[str, str]:
        request = self.requests[index]
        return {"caption": self.captions[index], "task": request.task, "request": plain(request)}


class SyntheticShapesSource(CaptionImageSource):
    """The embedded default source for ``CaptionImageDataModule``: synthetic shapes, no download.

    Args:
        num_train, num_val: lengths of the train and val streams (items are generated on the fly).
        seed: seeds both streams and the caption wording of the held-out prompts.
        heldout_fraction: share of combinations (of each task, in the compositional world) kept out of train/val
            and used as test prompts.
        num_test_prompts: number of held-out prompts scored by ``test`` (in the compositional world, the tasks take
            turns).
        keep: one_object world: train on a curated subset only: scene attribute -> allowed values, e.g.
            ``{size: [large]}`` (validation and test prompts are unchanged).
        world: ``one_object`` (one shape per image, scored per attribute) or ``compositional`` (1 to 4 objects in
            GenEval's six task types, scored per task).
        tasks: compositional world: the task types to train on and test (default: all six).
        object_size: compositional world: (smallest, largest) object side as a fraction of the shorter image side;
            the most objects a request asks for must fit.
    """

    def __init__(self, num_train: int = 1_000_000, num_val: int = 256, seed: int = 0,
                 heldout_fraction: float = 0.1, num_test_prompts: int = 64, keep: dict[str, list[str]] | None = None,
                 world: str = "one_object", tasks: list[str] | None = None,
                 object_size: tuple[float, float] = OBJECT_SIZE):
        field = "data.init_args.source.init_args"
        if world not in ("one_object", "compositional"):
            raise ConfigError(f"{field}.world={world!r} is not a world; use one_object or compositional")
        if world == "one_object" and (tasks is not None or tuple(object_size) != OBJECT_SIZE):
            raise ConfigError(f"{field}.tasks and object_size are settings of the compositional world; "
                              f"set {field}.world: compositional or remove them")
        if world == "compositional" and keep:
            raise ConfigError(f"{field}.keep filters the scenes of the one_object world; remove it or set "
                              f"{field}.world: one_object")
        unknown = sorted(set(keep or {}) - set(ATTRIBUTES))
        if unknown:
            raise ConfigError(f"data.source.keep has unknown attributes {unknown}; use {list(ATTRIBUTES)}")
        tasks = tuple(TASKS if tasks is None else tasks)
        if not tasks or set(tasks) - set(TASKS):
            raise ConfigError(f"{field}.tasks={list(tasks)} must be a non-empty list of {list(TASKS)}")
        low, high = object_size
        most = MAX_COUNT if "counting" in tasks else 1 + any(task not in ("single_object", "colors") for task in tasks)
        if not 0 < low <= high or not fits(most, object_size):
            largest = math.sqrt(0.5 * (1 - 2 * MARGIN) ** 2 / most) - GAP
            raise ConfigError(
                f"{field}.object_size={list(object_size)} does not fit the {most} objects that {list(tasks)} ask "
                f"for in one image; use 0 < smallest <= largest <= {largest:.3f} (or fewer objects: drop counting "
                f"from {field}.tasks)")
        self.keep = keep
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.num_test_prompts = num_test_prompts
        self.world = world
        self.tasks = tasks
        self.object_size = tuple(object_size)

    def _dataset(self, length: int, resolution: int, split: str) -> SyntheticShapes | SyntheticCompositions:
        if self.world == "compositional":
            return SyntheticCompositions(length, resolution, self.seed, split, self.heldout_fraction, self.tasks,
                                         self.object_size)
        return SyntheticShapes(length, resolution, self.seed, split, self.heldout_fraction)

    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> SyntheticShapes | SyntheticCompositions:
        if buckets:
            raise ConfigError("the synthetic source renders square images only; set data.buckets: false")
        dataset = self._dataset(self.num_train, resolution, "train")
        if self.keep:
            dataset.scenes = [s for s in dataset.scenes if all(getattr(s, k) in v for k, v in self.keep.items())]
            if not dataset.scenes:
                raise ConfigError(f"data.source.keep={self.keep} leaves no training scene; allow more values")
        return dataset

    def val_dataset(self, resolution: int) -> SyntheticShapes | SyntheticCompositions:
        return self._dataset(self.num_val, resolution, "val")

    def test_prompts(self) -> list[dict[str, str]]:
        if self.world == "compositional":
            prompts = HeldOutRequests(self.num_test_prompts, self.seed, self.heldout_fraction, self.tasks)
        else:
            prompts = HeldOutPrompts(self.num_test_prompts, self.seed, self.heldout_fraction)
        return [prompts[i] for i in range(len(prompts))]
