"""Drawing a :class:`Scene` analytically at any resolution, square or not, with anti-aliased edges.

The shape is placed with a small jitter around its grid cell's centre and kept inside the image; it is sized
from the shorter image side, so it is never stretched. Edges are anti-aliased by 4x4 supersampling. The jitter
is a fraction of the image, so the same scene and random draws give the same picture at every resolution.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from lit_dimba.scenes.world import BACKGROUND, COLOURS, POSITIONS, SIZE_FRACTIONS, Scene

# Largest offset of a shape's centre from its cell centre, as a fraction of each image axis.
JITTER = 0.04
# Smallest gap between a shape and the image border, as a fraction of each image axis.
MARGIN = 0.04
SUPERSAMPLE = 4


def image_size(resolution) -> tuple[int, int]:
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
    height, width = image_size(resolution)
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
