"""Placing the objects of a :class:`~lit_dimba.scenes.composition.Request` in an image of any aspect ratio.

Lengths are in units of the image's shorter side, so a layout looks the same at every resolution of one aspect
ratio and objects are never stretched. Every object has a square box of side ``side``; boxes keep ``MARGIN`` from
the image border and ``GAP`` from each other, so objects never touch, even after a little blur.

Where one object lies from another is GenEval's rule (``relations``): the offset between the box centres, each
axis shrunk by a tenth of the two boxes' extents, must point mostly along that axis. Position layouts keep a clear
margin on that rule, so a drawn "left of" reads as "left of" and nothing else.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lit_dimba.scenes.composition import Request, Thing

# Smallest gap between a box and the image border, and between two boxes, in units of the shorter image side.
MARGIN = 0.03
GAP = 0.06
# Default range of box sides, in units of the shorter image side (at 64^2: 11.5 to 16.6 pixels).
OBJECT_SIZE: tuple[float, float] = (0.18, 0.26)
# GenEval's tolerance: each axis of the offset between two boxes loses this fraction of their summed extents.
POSITION_THRESHOLD = 0.1
# A position layout puts the main axis of the normalised, shrunk offset at least this far out (GenEval: 0.5) and
# the other axis at most 1 minus it.
CLEAR = 0.75
# Draws per object before a layout starts again, and layouts before giving up.
TRIES = 30
LAYOUTS = 1000


@dataclass(frozen=True)
class Placed:
    """One object in a layout: what it is, its box centre (``x`` from the left, ``y`` from the top) and its box
    ``side``, all in units of the shorter image side."""

    thing: Thing
    x: float
    y: float
    side: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom)."""
        half = self.side / 2
        return self.x - half, self.y - half, self.x + half, self.y + half


def direction(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> tuple[float, float]:
    """GenEval's offset of box A from box B, (left, top, right, bottom) each: the centre offset, each axis shrunk
    by ``POSITION_THRESHOLD`` of the two boxes' summed extents along it (not past 0), divided by the length of the
    centre offset. (-1, 0) is straight left, (0, 1) straight below."""
    offsets = []
    for low, high in ((0, 2), (1, 3)):
        offset = (box_a[low] + box_a[high] - box_b[low] - box_b[high]) / 2
        extents = box_a[high] - box_a[low] + box_b[high] - box_b[low]
        offsets.append((offset, max(abs(offset) - POSITION_THRESHOLD * extents, 0.0)))
    length = math.hypot(offsets[0][0], offsets[1][0])
    if length == 0:
        return 0.0, 0.0
    return tuple(math.copysign(shrunk, offset) / length for offset, shrunk in offsets)


def relations(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> set[str]:
    """GenEval's relations of box A to box B: a subset of ``RELATIONS`` (a diagonal offset gives two, overlapping
    boxes none)."""
    dx, dy = direction(box_a, box_b)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in found.items() if holds}


def fits(count: int, object_size: tuple[float, float]) -> bool:
    """Whether ``count`` boxes of the largest side reliably find room by random draws in a square image: their
    boxes with gaps cover at most half of the area inside the margins."""
    return count * (object_size[1] + GAP) ** 2 <= 0.5 * (1 - 2 * MARGIN) ** 2


def _clear(relation: str, a: Placed, b: Placed) -> bool:
    dx, dy = direction(a.box, b.box)
    main, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return main >= CLEAR and abs(other) <= 1 - CLEAR


def lay_out(request: Request, width: float, height: float, rng: random.Random,
            object_size: tuple[float, float] = OBJECT_SIZE) -> tuple[Placed, ...]:
    """Random non-overlapping boxes for ``request.objects``, and for a position request the first clearly in its
    relation to the second.

    Each object draws its side uniformly from ``object_size`` and its centre uniformly inside the margins,
    ``TRIES`` times at most until its box keeps ``GAP`` from those placed; otherwise the layout starts again.

    Args:
        request: what to place.
        width, height: image extent in units of its shorter side (one of them is 1).
        rng: source of every draw.
        object_size: (smallest, largest) box side; must satisfy ``fits`` for the request's count.

    Returns:
        One ``Placed`` per object of ``request.objects``, in that order.
    """
    for _ in range(LAYOUTS):
        placed: list[Placed] = []
        for thing in request.objects:
            for _ in range(TRIES):
                side = rng.uniform(*object_size)
                half = side / 2 + MARGIN
                candidate = Placed(thing, rng.uniform(half, width - half), rng.uniform(half, height - half), side)
                if all(abs(candidate.x - other.x) >= (side + other.side) / 2 + GAP
                       or abs(candidate.y - other.y) >= (side + other.side) / 2 + GAP for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == len(request.objects) and (
                request.relation is None or _clear(request.relation, placed[0], placed[1])):
            return tuple(placed)
    raise RuntimeError(f"found no layout for {request} in {width:.2f} x {height:.2f} with sides {object_size}")
