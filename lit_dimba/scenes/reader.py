"""Reading an image back into the attributes of a :class:`Scene` by pixel analysis.

The image is taken to show the world of ``world.py`` (one filled shape on a plain background).
``read_scene`` works in these steps, on [0, 255] RGB values:

1. background = per-channel median of the border pixels;
2. foreground = pixels farther (Euclidean RGB) from the background than half the image's
   near-peak distance (and at least ``MIN_CONTRAST``), reduced to its largest 8-connected
   component; if that is smaller than ``MIN_AREA`` of the image, nothing is read;
3. colour = the palette colour whose segment from the background passes closest to the median
   of the component's stronger half (a segment, so washed-out but correctly hued shapes count);
4. a soft coverage map ``alpha`` = each pixel's projection onto background -> that median colour
   (1 inside the shape, 0 on the background), inside the component grown by one pixel. The maxima
   of its columns and rows give sub-pixel centre, width and height, which are insensitive to blur
   and anti-aliasing;
5. position = 3x3 cell of that centre; size = sqrt(width * height) against the shorter image
   side; shape from the drop of the mass centroid below the box centre, as a fraction of the
   height (upward triangle 1/6, circle and square 0), then from the fill ratio of the bounding
   box (square 1, circle pi/4).

Images larger than ``ANALYSIS_SIDE`` are area-downsampled first, which keeps the analysis fast.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lit_dimba.scenes.world import ATTRIBUTES, COLOURS, POSITIONS, SIZE_FRACTIONS

ANALYSIS_SIDE = 64
# Smallest RGB distance from the background (0-255 units) that can count as foreground; every
# palette colour is at least ~185 from the background.
MIN_CONTRAST = 64.0
# Smallest foreground, as a fraction of the image, that counts as a shape (a small triangle covers
# ~2.9%); anything less, e.g. a few speckles, reads as an empty image.
MIN_AREA = 0.005
# Boundary between "small" and "large": geometric mean of their side fractions.
SIZE_THRESHOLD = math.sqrt(SIZE_FRACTIONS["small"] * SIZE_FRACTIONS["large"])
# A shape whose mass centroid lies this far (fraction of its height) below its box centre is a
# triangle: 1/6 for a sharp one, but blur rounds the apex, so the threshold sits well below that.
TRIANGLE_OFFSET = 0.05
# Otherwise a fill ratio above this means square: ideally 1 against pi/4 for a circle, but blur and
# anti-aliasing push small circles up to ~0.88.
SQUARE_FILL = 0.92

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # [K, 3]


def grow(mask: np.ndarray) -> np.ndarray:
    """Max over each pixel's 3x3 neighbourhood. [H, W] -> [H, W]."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.max([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def _smooth(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over each pixel and its two neighbours along ``axis`` (zero beyond the edge). [H, W] -> [H, W]."""
    padded = np.pad(values, [(1, 1) if a == axis else (0, 0) for a in range(2)])
    return sum(np.take(padded, range(k, k + values.shape[axis]), axis=axis) for k in range(3)) / 3


def label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean mask [H, W], by label propagation: int64 [H, W], 0 off the mask and
    one positive label per component (not consecutive)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while mask.any():
        grown = np.where(mask, grow(labels), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean mask [H, W] (all False if none)."""
    if not mask.any():
        return mask
    labels = label_components(mask)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def nearest_colour(colour: np.ndarray, background: np.ndarray) -> str:
    """Palette name whose segment background -> palette colour passes closest to ``colour`` [3]."""
    directions = _PALETTE - background  # [K, 3]
    along = (directions @ (colour - background)) / (directions**2).sum(1)
    closest = background + np.clip(along, 0.0, 1.0)[:, None] * directions
    return _PALETTE_NAMES[int(np.linalg.norm(closest - colour, axis=1).argmin())]


def image_distances(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """An image [3, H, W] (float in [-1, 1]) as the pixel analysis sees it, area-downsampled to ``ANALYSIS_SIDE``
    on its longer side when larger: pixels [h, w, 3] float64 in 0..255, the background colour [3] (the median of
    the border), each pixel's distance from it [h, w], and the near-peak distance (a few pixels in, so isolated
    noisy pixels cannot set it)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    image = image.detach().float().cpu()
    height, width = image.shape[1:]
    if max(height, width) > ANALYSIS_SIDE:
        scale = ANALYSIS_SIDE / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None], size=size, mode="area")[0]
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.float64)  # [H, W, 3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # [2(H+W), 3]
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)  # [H, W]
    return pixels, background, distance, np.sort(distance, axis=None)[-max(4, distance.size // 200)]


def read_scene(image: torch.Tensor) -> dict[str, str | None]:
    """Read the single shape in an image back into scene attributes.

    Args:
        image: Tensor [3, H, W], float in [-1, 1].

    Returns:
        ``{"colour", "shape", "position", "size"}`` (the keys of ``ATTRIBUTES``) with values from the
        vocabularies of ``world.py``, or all ``None`` when no shape stands out from the background.
    """
    pixels, background, distance, peak = image_distances(image)
    height, width = distance.shape
    threshold = max(MIN_CONTRAST, peak / 2)
    mask = distance > threshold
    component = _largest_component(mask)
    if component.sum() < max(2, MIN_AREA * mask.size):
        return dict.fromkeys(ATTRIBUTES)

    strong = component & (distance >= np.median(distance[component]))
    foreground = np.median(pixels[strong], axis=0)  # [3]
    colour = nearest_colour(foreground, background)

    direction = foreground - background
    # Not clipped at 1, so that noise inside the shape averages out in the sums below.
    alpha = np.clip((pixels - background) @ direction / (direction @ direction), 0.0, None)
    alpha = alpha * grow(component)  # [H, W]
    # Centre from the column / row maxima; width and height from maxima after a 3-pixel mean along
    # each column / row, so that noise does not inflate them (the mean would blunt a triangle's apex
    # and shift its centre, hence the two versions).
    clipped = np.clip(alpha, 0.0, 1.0)
    columns, rows = clipped.max(axis=0), clipped.max(axis=1)  # [W], [H]
    centre_x = (columns * (np.arange(width) + 0.5)).sum() / columns.sum()
    centre_y = (rows * (np.arange(height) + 0.5)).sum() / rows.sum()
    shape_width = np.clip(_smooth(alpha, axis=0), 0.0, 1.0).max(axis=0).sum()
    shape_height = np.clip(_smooth(alpha, axis=1), 0.0, 1.0).max(axis=1).sum()
    mass_y = (alpha.sum(axis=1) * (np.arange(height) + 0.5)).sum() / alpha.sum()

    fill = alpha.sum() / (shape_width * shape_height)
    if (mass_y - centre_y) / shape_height > TRIANGLE_OFFSET:
        shape = "triangle"
    else:
        shape = "square" if fill > SQUARE_FILL else "circle"
    row = min(int(3 * centre_y / height), 2)
    col = min(int(3 * centre_x / width), 2)
    extent = math.sqrt(shape_width * shape_height) / min(height, width)
    return {
        "colour": colour,
        "shape": shape,
        "position": POSITIONS[3 * row + col],
        "size": "large" if extent > SIZE_THRESHOLD else "small",
    }
