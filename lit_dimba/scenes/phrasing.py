"""Wording a :class:`~lit_dimba.scenes.composition.Request` as a caption in varied natural language, and reading a
caption back into a request.

Every object is named as colour then shape ("a red circle", "three green triangles"), so a caption binds each
colour to its shape; relations use the synonyms of ``RELATION_PHRASES``; the sentence around them comes from the
templates of each request form. ``describe`` picks a random wording; ``plain`` gives the one fixed wording that
test prompts carry; ``parse`` reads any of them back, and refuses, as a ``ConfigError`` that names the words, a
caption the world cannot draw.
"""

from __future__ import annotations

import random
import re

from lit_dimba.errors import ConfigError
from lit_dimba.scenes.composition import MAX_COUNT, OBJECT_SHAPES, RELATIONS, TASKS, Request, Thing
from lit_dimba.scenes.world import COLOURS

NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                           8: "eight", 9: "nine", 10: "ten"}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher up than"),
    "below": ("below", "under", "beneath", "lower down than"),
}
# {a}: one object, {b}: a second one, {many}: the copies of a counting request, {relation}: a relation phrase.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "one": ("{a}", "a picture of {a}", "{a} on a grey background", "there is {a}", "an image showing {a}",
            "just {a}", "{a}, alone", "a photo of {a}"),
    "pair": ("{a} and {b}", "{a} next to {b}", "{a} together with {b}", "there are {a} and {b}",
             "a picture of {a} and {b}", "{a} as well as {b}", "a photo of {a} and {b}"),
    "counting": ("{many}", "exactly {many}", "there are {many}", "a group of {many}", "a picture of {many}",
                 "a photo of {many}", "{many} on a grey background"),
    "position": ("{a} {relation} {b}", "there is {a} {relation} {b}", "{a} is {relation} {b}",
                 "a picture of {a} {relation} {b}", "a photo of {a} {relation} {b}"),
}
_FORM = {"single_object": "one", "colors": "one", "two_object": "pair", "color_attr": "pair", "counting": "counting",
         "position": "position"}

_OBJECT = re.compile(rf"\b(a|an|{'|'.join(NUMBERS.values())}) ({'|'.join(COLOURS)}) ({'|'.join(OBJECT_SHAPES)})"
                     r"(?:s|es)?\b")
_RELATION = {phrase: relation for relation, phrases in RELATION_PHRASES.items() for phrase in phrases}
_OBJECT_WORDS = {*COLOURS, *OBJECT_SHAPES, *(shape + "s" for shape in OBJECT_SHAPES), "crosses"}
# Every word a caption may use; any other word is one the world does not know.
_WORDS = {*_OBJECT_WORDS, "a", "an",
          *NUMBERS.values(), *re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(
              [*_RELATION, *(template for templates in TEMPLATES.values() for template in templates)])))}


def _noun(thing: Thing, count: int, article: str) -> str:
    """"a red circle", "an ..." before a vowel, "one red circle", "three red crosses"."""
    if count > 1:
        return f"{NUMBERS[count]} {thing.colour} {thing.shape}{'es' if thing.shape == 'cross' else 's'}"
    return re.sub(r"^a(?= [aeiou])", "an", f"{article} {thing.colour} {thing.shape}")


def _fill(request: Request, template: str, articles: tuple[str, str], relation_phrase: str) -> str:
    names = [_noun(thing, 1, article) for thing, article in zip(request.things, articles)]
    return template.format(a=names[0], b=names[-1], many=_noun(request.things[0], request.count, "a"),
                           relation=relation_phrase)


def describe(request: Request, rng: random.Random) -> str:
    """A randomly worded caption of ``request``; ``rng`` picks the template, relation phrase and articles."""
    template = rng.choice(TEMPLATES[_FORM[request.task]])
    articles = (rng.choice(("a", "one")), rng.choice(("a", "one")))
    relation_phrase = rng.choice(RELATION_PHRASES[request.relation]) if request.relation else ""
    return _fill(request, template, articles, relation_phrase)


def plain(request: Request) -> str:
    """The first wording of every choice: "a red circle", "a red circle and a blue square", "three green stars",
    "a red circle to the left of a blue square"."""
    relation_phrase = RELATION_PHRASES[request.relation][0] if request.relation else ""
    return _fill(request, TEMPLATES[_FORM[request.task]][0], ("a", "a"), relation_phrase)


def parse(caption: str, task: str) -> Request:
    """The request that a caption of the world asks for, scored as ``task``.

    Objects are read as "<article or number> <colour> <shape>", a relation from the words between the first two.

    Raises:
        ConfigError: the caption uses a word the world does not know (e.g. a colour or shape it does not draw),
            asks for more than ``MAX_COUNT`` objects, or does not have the form of a ``task`` caption.
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {TASKS}")
    text = " ".join(re.findall(r"[a-z]+", caption.lower()))
    unknown = [word for word in text.split() if word not in _WORDS]
    if unknown:
        raise ConfigError(
            f"caption {caption!r} has words the world cannot draw: {unknown}; its captions name colours "
            f"({', '.join(COLOURS)}), shapes ({', '.join(OBJECT_SHAPES)}), counts up to {MAX_COUNT} and the "
            f"relations {', '.join(RELATIONS)}")
    found = list(_OBJECT.finditer(text))
    loose = [word for word in _OBJECT.sub(" ", text).split() if word in _OBJECT_WORDS]
    if loose:
        raise ConfigError(f"caption {caption!r} names {loose} outside an object; name every object as "
                          "'<a, one or a count> <colour> <shape>', e.g. 'a red circle', 'three green stars'")
    counts = [1 if match[1] in ("a", "an") else list(NUMBERS.values()).index(match[1]) + 1 for match in found]
    if max(counts, default=1) > MAX_COUNT:
        raise ConfigError(f"caption {caption!r} asks for {max(counts)} objects; the world draws 1 to {MAX_COUNT}")
    between = text[found[0].end():found[1].start()] if len(found) > 1 else ""
    relations = [relation for phrase, relation in sorted(_RELATION.items(), key=lambda item: -len(item[0]))
                 if re.search(rf"\b{phrase}\b", between)]
    things = tuple(Thing(match[2], match[3]) for match in found)
    try:
        return Request(task, things, max(counts, default=1), relations[0] if relations else None)
    except ValueError as error:
        raise ConfigError(f"caption {caption!r} is not a {task} caption of the world ({error}); "
                          f"e.g. {plain(_EXAMPLES[task])!r}") from error


# One request of each task, for error messages.
_EXAMPLES = {
    "single_object": Request("single_object", (Thing("purple", "star"),)),
    "colors": Request("colors", (Thing("cyan", "diamond"),)),
    "two_object": Request("two_object", (Thing("red", "circle"), Thing("blue", "cross"))),
    "color_attr": Request("color_attr", (Thing("red", "square"), Thing("green", "circle"))),
    "counting": Request("counting", (Thing("green", "triangle"),), 3),
    "position": Request("position", (Thing("yellow", "circle"), Thing("blue", "square")), relation="left of"),
}
