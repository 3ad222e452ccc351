"""Wording a :class:`Scene` as a caption in varied natural language.

Every phrase names exactly one value, so captions stay unambiguous: colour and shape always appear verbatim
(``COLOURS`` keys, ``SHAPES``), size and position through the synonyms of ``SIZE_WORDS`` and
``POSITION_PHRASES`` (e.g. "little", "upper left corner"), in one of the sentence forms of ``TEMPLATES``.
"""

from __future__ import annotations

import random
import re

from lit_dimba.scenes.world import Scene

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
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
TEMPLATES: tuple[str, ...] = (
    "{a} {size} {colour} {shape} in the {where}",
    "{a} {size} {colour} {shape} located in the {where}",
    "there is {a} {size} {colour} {shape} in the {where}",
    "in the {where} there is {a} {size} {colour} {shape}",
    "{a} {size} {shape} in {colour}, placed in the {where}",
    "{a} {shape}, {size} and {colour}, in the {where}",
    "{a} {colour} {shape} that is {size}, at the {where}",
    "{size} {colour} {shape}, {where}",
)


def caption(scene: Scene, rng: random.Random) -> str:
    """A randomly phrased caption naming the scene's colour, shape, position and size; ``rng`` picks the wording."""
    template = rng.choice(TEMPLATES)
    article = rng.choice(("a", "one"))
    words = {
        "size": rng.choice(SIZE_WORDS[scene.size]),
        "colour": scene.colour,
        "shape": scene.shape,
        "where": rng.choice(POSITION_PHRASES[scene.position]),
    }
    text = template.format(a=article, **words)
    return re.sub(r"\ba(?= [aeiou])", "an", text)  # "a orange" -> "an orange"
