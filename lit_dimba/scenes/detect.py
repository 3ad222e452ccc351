"""Reading the objects of an image of the multi-object world back, by pixel analysis: what GenEval's object
detector and colour classifier do for photographs.

``find_objects`` works in these steps, on [0, 255] RGB values:

1. images larger than ``reader.ANALYSIS_SIDE`` (longer side) are area-downsampled to it (``image_distances``);
2. background = per-channel median of the border pixels;
3. cores = pixels farther (Euclidean RGB) from the background than ``CORE`` of the image's near-peak distance
   (and at least ``MIN_CONTRAST``), split into 8-connected components; components smaller than ``MIN_AREA`` of
   the image are noise. Objects are drawn ``layout.GAP`` apart, so blurred neighbours stay apart;
4. each component takes the pixels up to ``REACH`` pixels around it (a pixel between two goes to one of them);
   its colour is the palette colour whose segment from the background passes closest to the median of its
   stronger half (``reader.nearest_colour``), and its soft coverage ``alpha`` is each pixel's projection onto
   background -> that median colour (1 inside, 0 outside, blurred edges in between);
5. its shape is the one whose template, ``draw.coverage`` with the area and mass centre of ``alpha``, differs
   least from ``alpha``: the sum of absolute differences after a 3x3 box blur of both, which makes a blurred
   image look like its template and keeps thin parts (a cross's arms) from deciding alone. Area and mass centre
   do not change under blur, so neither do the templates; the template's box is the object's box.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from lit_dimba.scenes.composition import OBJECT_SHAPES
from lit_dimba.scenes.draw import coverage
from lit_dimba.scenes.reader import MIN_CONTRAST, grow, image_distances, label_components, nearest_colour

# Share of the near-peak distance from the background above which a pixel belongs to an object's core: about half
# coverage of the strongest colour, so blurred edges and the gaps between objects stay out.
CORE = 0.45
# Smallest core, as a fraction of the image, that counts as an object (at 64^2: 12 pixels, where the smallest
# star's core has about 40).
MIN_AREA = 0.003
# How far around its core an object's soft edge is read, in pixels.
REACH = 2


@dataclass(frozen=True)
class Found:
    """One object read from an image: ``colour`` (a key of ``COLOURS``), ``shape`` (one of ``OBJECT_SHAPES``), its
    box (left, top, right, bottom) in pixels of the analysed image, and its ``area`` in pixels."""

    colour: str
    shape: str
    box: tuple[float, float, float, float]
    area: float


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float]:
    """(area, mass centre below the box centre) of a shape, in units of its box area and half side."""
    half = 100.0
    offsets = np.arange(-110, 110, dtype=np.float64) + 0.5
    alpha = coverage(shape, offsets[None, :], offsets[:, None], half)
    return alpha.sum() / (2 * half) ** 2, (alpha.sum(axis=1) * offsets).sum() / alpha.sum() / half


def _blur(values: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood, zero beyond the edge. [h, w] -> [h, w]."""
    padded = np.pad(values, 1)
    height, width = values.shape
    return sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9


def _fit_shape(alpha: np.ndarray) -> tuple[str, tuple[float, float, float, float]]:
    """The shape whose template best matches a soft coverage map [h, w] in [0, 1], and the template's box."""
    area = alpha.sum()
    ys, xs = np.arange(alpha.shape[0]) + 0.5, np.arange(alpha.shape[1]) + 0.5
    centre_x = (alpha.sum(axis=0) * xs).sum() / area
    centre_y = (alpha.sum(axis=1) * ys).sum() / area
    blurred, best = _blur(alpha), None
    for shape in OBJECT_SHAPES:
        unit_area, drop = _unit_moments(shape)
        half = math.sqrt(area / unit_area) / 2
        box_y = centre_y - drop * half
        template = coverage(shape, xs[None, :] - centre_x, ys[:, None] - box_y, half)
        error = np.abs(blurred - _blur(template)).sum()
        if best is None or error < best[0]:
            best = error, shape, (centre_x - half, box_y - half, centre_x + half, box_y + half)
    return best[1], best[2]


def find_objects(image: torch.Tensor) -> list[Found]:
    """The objects in an image, largest first.

    Args:
        image: Tensor [3, H, W], float in [-1, 1].

    Returns:
        One ``Found`` per object; empty when nothing stands out from the background.
    """
    pixels, background, distance, peak = image_distances(image)
    cores = label_components(distance > max(MIN_CONTRAST, CORE * peak))
    labels, counts = np.unique(cores[cores > 0], return_counts=True)
    labels = labels[counts >= max(2, MIN_AREA * distance.size)]
    cores = np.where(np.isin(cores, labels), cores, 0)
    regions = cores
    for _ in range(REACH):
        regions = np.where(regions > 0, regions, grow(regions))

    objects = []
    for label in labels:
        core, region = cores == label, regions == label
        strong = core & (distance >= np.median(distance[core]))
        colour = np.median(pixels[strong], axis=0)  # [3]
        direction = colour - background
        alpha = np.clip((pixels - background) @ direction / (direction @ direction), 0.0, 1.0) * region
        rows, cols = np.nonzero(region)
        top, left = rows.min(), cols.min()
        shape, box = _fit_shape(alpha[top:rows.max() + 1, left:cols.max() + 1])
        objects.append(Found(nearest_colour(colour, background), shape,
                             (box[0] + left, box[1] + top, box[2] + left, box[3] + top), float(alpha.sum())))
    return sorted(objects, key=lambda found: -found.area)
