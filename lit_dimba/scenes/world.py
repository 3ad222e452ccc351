"""The vocabulary of the synthetic world: what one image can show, and the palette it is drawn in.

An image shows one filled shape on a plain light-grey background, described by a :class:`Scene`: a colour, a
shape, the cell of a 3x3 grid holding its centre, and a size. The world is kept easy to learn and easy to read
back by pixel analysis:

- six saturated colours whose RGB values are at least ~135 apart (and ~185 from the background);
- three shapes with distinct fill ratios of their bounding box (square 1, circle ~0.79, triangle 0.5; the
  triangle always points up);
- two sizes, large shapes spanning 45% and small ones 30% of the shorter image side.

Drawing is in ``render.py``, wording in ``captions.py``, reading an image back in ``reader.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

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
        for field, allowed in zip(ATTRIBUTES, (tuple(COLOURS), SHAPES, POSITIONS, SIZES)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Scene.{field} must be one of {allowed}, got {value!r}")


# The attributes a scene is made of, in order: ("colour", "shape", "position", "size").
ATTRIBUTES: tuple[str, ...] = tuple(field.name for field in fields(Scene))


def all_scenes() -> list[Scene]:
    """Every combination of colour, shape, position and size (6 * 3 * 9 * 2 = 324), in a fixed order."""
    return [Scene(*values) for values in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]
