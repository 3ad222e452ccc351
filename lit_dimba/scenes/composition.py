"""The multi-object world: what a prompt asks for (:class:`Request`) in GenEval's six task types, and every
request each task can make.

An image of this world shows 1 to ``MAX_COUNT`` filled objects on the plain background of ``world.py``, none
overlapping; an object is one of ``OBJECT_SHAPES`` in one of ``COLOURS``. The caption names every object with its
colour, so it describes the whole image. The task types, named as in GenEval, and what each checks in the image
(``lit_dimba.eval.prompt_following.follows``):

============== ============================================ =================================================
task           asks for                                     right when the image shows
============== ============================================ =================================================
single_object  one object: "a purple star"                  an object of that shape
two_object     two objects: "a red circle and a blue cross" an object of each shape
counting       2 to 4 copies: "three green triangles"       exactly that many objects of that shape
colors         one object: "a cyan diamond"                 that shape, in that colour
position       "a yellow circle to the left of a blue       both shapes, the first in that direction from
               square" (left of, right of, above, below)    the second
color_attr     two objects: "a red square and a green       each shape in its own colour
               circle"
============== ============================================ =================================================

single_object and colors ask for the same kind of picture, as do two_object and color_attr; the tasks differ in
what is checked, as in GenEval. Layout is in ``layout.py``, drawing in ``draw.py``, wording in ``phrasing.py``,
reading an image back in ``detect.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lit_dimba.scenes.world import COLOURS

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Chosen to stay apart when small and blurred: different fill of their box (square 1, circle 0.79, cross 0.56,
# triangle and diamond 0.5, star 0.37), and triangle (mass low) and diamond (mass centred) told apart by shape.
OBJECT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# The relation that says the same with the two objects swapped ("A left of B" is "B right of A").
CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# GenEval counts 2 to 4 objects.
MAX_COUNT = 4


@dataclass(frozen=True)
class Thing:
    """One kind of object: a key of ``COLOURS`` and one of ``OBJECT_SHAPES``."""

    colour: str
    shape: str

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"Thing.colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.shape not in OBJECT_SHAPES:
            raise ValueError(f"Thing.shape must be one of {OBJECT_SHAPES}, got {self.shape!r}")


@dataclass(frozen=True)
class Request:
    """What one prompt asks for, and which task type scores it.

    Attributes:
        task: one of ``TASKS``.
        things: one thing (single_object, colors, counting) or two of different shapes and colours (two_object,
            color_attr, position).
        count: how many copies of the thing (counting: 2 to ``MAX_COUNT``; otherwise 1).
        relation: position only: one of ``RELATIONS``, where ``things[0]`` lies from ``things[1]``.
    """

    task: str
    things: tuple[Thing, ...]
    count: int = 1
    relation: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Request.task must be one of {TASKS}, got {self.task!r}")
        pairs = self.task in ("two_object", "color_attr", "position")
        if len(self.things) != (2 if pairs else 1):
            raise ValueError(f"a {self.task} request asks for {2 if pairs else 1} things, got {self.things}")
        if pairs and (self.things[0].shape == self.things[1].shape or self.things[0].colour == self.things[1].colour):
            raise ValueError(f"the two things of a {self.task} request differ in shape and colour, got {self.things}")
        counts = range(2, MAX_COUNT + 1) if self.task == "counting" else (1,)
        if self.count not in counts:
            raise ValueError(f"a {self.task} request counts {counts[0]} to {counts[-1]}, got {self.count}")
        if (self.relation is not None) != (self.task == "position") or self.relation not in (None, *RELATIONS):
            raise ValueError(f"only position requests have a relation (one of {RELATIONS}), got {self.relation!r}")

    @property
    def objects(self) -> tuple[Thing, ...]:
        """Every object of the picture, in order: the thing ``count`` times, or the two things."""
        return self.things * self.count

    @property
    def key(self) -> tuple:
        """What the picture shows, whatever the task and the order of words: the things of a pair in a fixed order,
        and a position as "left of" or "above" (its converse swaps the things)."""
        things, relation = self.things, self.relation
        if relation in ("right of", "below"):
            things, relation = things[::-1], CONVERSE[relation]
        elif relation is None and len(things) == 2:
            things = tuple(sorted(things, key=_thing_order))
        return things, self.count, relation


def _thing_order(thing: Thing) -> tuple[int, int]:
    return tuple(COLOURS).index(thing.colour), OBJECT_SHAPES.index(thing.shape)


def all_requests(task: str) -> list[Request]:
    """Every request of ``task``, in a fixed order: single_object and colors 6 * 6 = 36; two_object and color_attr
    450 pairs; counting 3 * 36 = 108; position 4 * 900 = 3,600 (each picture twice: "A left of B", "B right of
    A")."""
    things = [Thing(colour, shape) for colour, shape in itertools.product(COLOURS, OBJECT_SHAPES)]
    if task in ("single_object", "colors"):
        return [Request(task, (thing,)) for thing in things]
    if task == "counting":
        return [Request(task, (thing,), count) for count in range(2, MAX_COUNT + 1) for thing in things]
    pairs = [(a, b) for a, b in itertools.permutations(things, 2) if a.shape != b.shape and a.colour != b.colour]
    if task == "position":
        return [Request(task, pair, relation=relation) for relation in RELATIONS for pair in pairs]
    if task in ("two_object", "color_attr"):
        return [Request(task, pair) for pair in pairs if _thing_order(pair[0]) < _thing_order(pair[1])]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
