"""Drawing a layout of objects (``layout.py``) at any resolution, with anti-aliased edges.

Each shape is given by a signed distance (pixels, negative inside) from its box centre; a pixel's coverage is
``clip(0.5 - distance, 0, 1)``, the share of a one-pixel-wide pixel on the inside of an edge through it. Only the
pixels of each object's box are evaluated, in numpy, so a 64^2 image of four objects takes well under a
millisecond. The reader (``detect.py``) fits shapes with the same ``coverage``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lit_dimba.scenes.layout import Placed
from lit_dimba.scenes.render import image_size
from lit_dimba.scenes.world import BACKGROUND, COLOURS

# Star: inner radius over outer radius (a regular pentagram has 0.38; a fatter star survives blur better).
STAR_INNER = 0.5
# Cross: half the width of an arm over half the box side.
CROSS_ARM = 1 / 3

_SECTOR = 2 * math.pi / 5
# The star's edge from its top tip (0, 1) to the inner corner at 36 degrees, both at outer radius 1; the unit
# normal of that edge pointing out of the star.
_TIP = np.array([0.0, 1.0])
_INNER = STAR_INNER * np.array([math.sin(_SECTOR / 2), math.cos(_SECTOR / 2)])
_STAR_NORMAL = np.array([_TIP[1] - _INNER[1], _INNER[0]]) / np.linalg.norm(_TIP - _INNER)


def distance(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Signed distance to a shape's outline (negative inside), exact near its edges.

    Args:
        shape: one of ``OBJECT_SHAPES``.
        dx, dy: offsets from the box centre, to the right and downwards; arrays that broadcast, e.g. [1, W] and
            [H, 1].
        half: half the box side, in the units of ``dx`` and ``dy``.

    Returns:
        Array of the broadcast shape of ``dx`` and ``dy``.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - half
    if shape == "square":
        return np.maximum(ax, ay) - half
    if shape == "diamond":
        return (ax + ay - half) / math.sqrt(2)
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return np.maximum(dy - half, (2 * ax - dy - half) / math.sqrt(5))
    if shape == "cross":
        arm = CROSS_ARM * half
        return np.minimum(np.maximum(ax - half, ay - arm), np.maximum(ax - arm, ay - half))
    if shape == "star":  # five points, one straight up; fold every point onto the sector of the top right edge
        radius = np.sqrt(dx**2 + dy**2)
        angle = np.abs((np.arctan2(dx, -dy) + _SECTOR / 2) % _SECTOR - _SECTOR / 2)
        x, y = radius * np.sin(angle), radius * np.cos(angle)
        return _STAR_NORMAL[0] * x + _STAR_NORMAL[1] * (y - half)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Anti-aliased share of each pixel inside the shape, in [0, 1]; arguments in pixels, as for ``distance``."""
    return np.clip(0.5 - distance(shape, dx, dy, half), 0.0, 1.0)


def draw(objects: tuple[Placed, ...], resolution: int | tuple[int, int]) -> torch.Tensor:
    """Draw objects on the background.

    Args:
        objects: a layout of boxes in units of the shorter image side (``layout.lay_out``).
        resolution: image side, or (height, width).

    Returns:
        Tensor [3, H, W], float32 in [-1, 1].
    """
    height, width = image_size(resolution)
    scale = min(height, width)
    background = np.array(BACKGROUND, dtype=np.float32) / 127.5 - 1
    image = np.empty((3, height, width), dtype=np.float32)
    image[:] = background[:, None, None]
    for placed in objects:
        cx, cy, half = placed.x * scale, placed.y * scale, placed.side * scale / 2
        left, top = max(int(cx - half) - 1, 0), max(int(cy - half) - 1, 0)
        right, bottom = min(int(cx + half) + 2, width), min(int(cy + half) + 2, height)
        dx = np.arange(left, right, dtype=np.float32)[None, :] + (0.5 - cx)
        dy = np.arange(top, bottom, dtype=np.float32)[:, None] + (0.5 - cy)
        alpha = coverage(placed.thing.shape, dx, dy, half)  # [h, w]
        colour = np.array(COLOURS[placed.thing.colour], dtype=np.float32) / 127.5 - 1
        image[:, top:bottom, left:right] += alpha * (colour - background)[:, None, None]
    return torch.from_numpy(image)
