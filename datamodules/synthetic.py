"""Embedded synthetic text-to-image data: one filled shape on a plain background.

Every image shows a single shape described by a :class:`Scene` (colour, shape, position on a
3x3 grid, size) on a fixed light-grey background, with a natural-language caption such as
"a small red circle in the top left corner". Images are rendered analytically at any
resolution (square or not) with 4x4 supersampled anti-aliasing, so the data set needs no
files and no downloads.

The world is kept deliberately easy to learn, and easy to read back by pixel analysis
(see ``lit_dimba.eval.prompt_following``):

- six saturated colours whose RGB values are at least ~135 apart (and ~185 from the background);
- three shapes with distinct fill ratios of their bounding box (square 1, circle ~0.79,
  triangle 0.5; the triangle always points up);
- shapes are placed with a small jitter around their grid cell's centre and kept inside the
  image, large shapes span 45% and small ones 30% of the shorter image side;
- the background is always ``BACKGROUND``, a neutral light grey.

All randomness comes from ``random.Random`` instances. Dataset items use one seeded from a
stable hash of ``(seed, split, index)``, so every sample is a pure function of those and the
resolution; jitter is drawn as a fraction of the image, so the same item at two resolutions
shows the same scene, jitter and caption.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.caption_image import CaptionImageSource
from lit_dimba.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "yellow": (240, 205, 20),
    "green": (35, 165, 55),
    "cyan": (0, 190, 200),
    "blue": (35, 60, 225),
    "purple": (185, 45, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
SIZES: tuple[str, ...] = ("small", "large")

BACKGROUND: tuple[int, int, int] = (225, 225, 225)
# Side length of a shape's bounding box as a fraction of the shorter image side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.30, "large": 0.45}
# Largest offset of a shape's centre from its cell centre, as a fraction of each image axis.
JITTER = 0.04
# Smallest gap between a shape and the image border, as a fraction of each image axis.
MARGIN = 0.04
SUPERSAMPLE = 4

# Caption vocabulary. Every phrase names exactly one value, so captions stay unambiguous.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "top left": ("top left corner", "top left", "upper left corner", "top-left corner"),
    "top": ("top centre", "top center", "top middle", "upper middle"),
    "top right": ("top right corner", "top right", "upper right corner", "top-right corner"),
    "left": ("middle left", "left side", "centre left", "left middle"),
    "center": ("centre", "center", "middle", "very middle"),
    "right": ("middle right", "right side", "centre right", "right middle"),
    "bottom left": ("bottom left corner", "bottom left", "lower left corner", "bottom-left corner"),
    "bottom": ("bottom centre", "bottom center", "bottom middle", "lower middle"),
    "bottom right": ("bottom right corner", "bottom right", "lower right corner", "bottom-right corner"),
}
_TEMPLATES = (
    "{a} {size} {colour} {shape} in the {where}",
    "{a} {size} {colour} {shape} located in the {where}",
    "there is {a} {size} {colour} {shape} in the {where}",
    "in the {where} there is {a} {size} {colour} {shape}",
    "{a} {size} {shape} in {colour}, placed in the {where}",
    "{a} {shape}, {size} and {colour}, in the {where}",
    "{a} {colour} {shape} that is {size}, at the {where}",
    "{size} {colour} {shape}, {where}",
)


@dataclass(frozen=True)
class Scene:
    """What one image shows: a single filled shape.

    Attributes:
        colour: a key of ``COLOURS``.
        shape: one of ``SHAPES``.
        position: one of ``POSITIONS``, the 3x3 grid cell holding the shape's centre.
        size: one of ``SIZES``.
    """

    colour: str
    shape: str
    position: str
    size: str

    def __post_init__(self):
        for field, allowed in (
            ("colour", tuple(COLOURS)), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Scene.{field} must be one of {allowed}, got {value!r}")


def all_scenes() -> list[Scene]:
    """Every combination of colour, shape, position and size (6 * 3 * 9 * 2 = 324), in a fixed order."""
    return [Scene(*values) for values in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]


def _image_size(resolution) -> tuple[int, int]:
    """Normalise ``resolution`` (int side or (height, width)) to (height, width); ValueError otherwise."""
    sides = (resolution, resolution) if not isinstance(resolution, (tuple, list)) else tuple(resolution)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"resolution must be a positive int or a (height, width) pair of them, got {resolution!r}")
    return sides


def render(scene: Scene, resolution: int | tuple[int, int], rng: random.Random) -> torch.Tensor:
    """Draw ``scene`` as an anti-aliased image.

    The shape's bounding-box centre is its cell centre (1/6, 1/2 or 5/6 of each axis) plus a
    uniform jitter of up to ``JITTER`` of that axis, then clamped so the shape stays ``MARGIN``
    inside the image. ``rng`` supplies the jitter (two ``rng.uniform`` draws).

    Args:
        scene: what to draw.
        resolution: image side, or (height, width).
        rng: source of the position jitter.

    Returns:
        Tensor [3, H, W], float32 in [-1, 1].
    """
    height, width = _image_size(resolution)
    row, col = divmod(POSITIONS.index(scene.position), 3)
    side = SIZE_FRACTIONS[scene.size] * min(height, width)
    centre = []
    for cell, length in ((col, width), (row, height)):
        offset = (cell + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
        low, high = side / 2 + MARGIN * length, length - side / 2 - MARGIN * length
        centre.append(min(max(offset * length, low), high))
    cx, cy = centre

    # Sample points at the centres of a SUPERSAMPLE x SUPERSAMPLE grid inside every pixel.
    ys = (torch.arange(height * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    xs = (torch.arange(width * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    dy, dx = (ys - cy)[:, None], (xs - cx)[None, :]
    half = side / 2
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif scene.shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # triangle pointing up: apex at the top, base as wide as the shape is tall
        depth = dy + half  # distance below the apex
        inside = (depth <= side) & (dx.abs() <= depth / 2)
    coverage = F.avg_pool2d(inside[None, None].float(), SUPERSAMPLE)[0]  # [1, H, W]

    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]
    colour = torch.tensor(COLOURS[scene.colour], dtype=torch.float32)[:, None, None]
    image = background + coverage * (colour - background)  # [3, H, W] in [0, 255]
    return image / 127.5 - 1.0


def caption(scene: Scene, rng: random.Random) -> str:
    """A randomly phrased caption naming the scene's colour, shape, position and size.

    Colour and shape always appear verbatim (``COLOURS`` keys, ``SHAPES``); size and position
    use synonyms (e.g. "little", "upper left corner") that each name a single value.
    """
    template = rng.choice(_TEMPLATES)
    article = rng.choice(("a", "one"))
    words = {
        "size": rng.choice(_SIZE_WORDS[scene.size]),
        "colour": scene.colour,
        "shape": scene.shape,
        "where": rng.choice(_POSITION_PHRASES[scene.position]),
    }
    text = template.format(a=article, **words)
    return re.sub(r"\ba(?= [aeiou])", "an", text)  # "a orange" -> "an orange"


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
        _image_size(value)
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
        unknown = sorted(set(keep or {}) - set(Scene.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"data.source.keep has unknown attributes {unknown}; use "
                              f"{list(Scene.__dataclass_fields__)}")
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
