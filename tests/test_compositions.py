"""The compositional world: requests, captions and their parser, layouts, drawing, data sets and held-out prompts."""

import itertools
import random
import re
import time

import pytest
import torch

from datamodules.synthetic import HeldOutRequests, SyntheticCompositions, SyntheticShapesSource, heldout_requests
from lit_dimba.errors import ConfigError
from lit_dimba.scenes import BACKGROUND, COLOURS
from lit_dimba.scenes.composition import OBJECT_SHAPES, RELATIONS, TASKS, Request, Thing, all_requests
from lit_dimba.scenes.draw import coverage, draw
from lit_dimba.scenes.layout import GAP, MARGIN, lay_out, relations
from lit_dimba.scenes.phrasing import RELATION_PHRASES, describe, parse, plain


def test_vocabulary_and_requests():
    assert len(COLOURS) >= 6 and len(OBJECT_SHAPES) >= 6
    sizes = {task: len(all_requests(task)) for task in TASKS}
    assert sizes == {"single_object": 36, "colors": 36, "two_object": 450, "color_attr": 450, "counting": 108,
                     "position": 3600}
    for task in TASKS:
        assert len(set(all_requests(task))) == sizes[task]
    position = all_requests("position")
    assert len({request.key for request in position}) == 1800  # "A left of B" is "B right of A"
    with pytest.raises(ValueError, match="differ"):
        Request("two_object", (Thing("red", "circle"), Thing("red", "square")))
    with pytest.raises(ValueError, match="counts 2 to 4"):
        Request("counting", (Thing("red", "circle"),), 5)
    with pytest.raises(ValueError, match="relation"):
        Request("two_object", (Thing("red", "circle"), Thing("blue", "square")), relation="above")
    with pytest.raises(ValueError, match="shape"):
        Thing("red", "hexagon")


def test_captions_round_trip_and_vary():
    rng = random.Random(0)
    for task in TASKS:
        requests = all_requests(task)
        captions = set()
        for request in rng.sample(requests, min(60, len(requests))):
            assert parse(plain(request), task) == request
            for _ in range(3):
                text = describe(request, rng)
                assert parse(text, task) == request, text
                captions.add(text)
                assert not re.search(r"\ba [aeiou]", text)
        # the wording varies: strip the objects and relation, count the sentence forms left
        forms = {re.sub("|".join([*COLOURS, *OBJECT_SHAPES, *RELATION_PHRASES["left of"]]), "", text)
                 for text in captions}
        assert len(forms) >= 4, (task, forms)
    assert plain(Request("counting", (Thing("green", "cross"),), 3)) == "three green crosses"
    assert plain(Request("position", (Thing("yellow", "circle"), Thing("blue", "square")), relation="left of")) \
        == "a yellow circle to the left of a blue square"
    position = all_requests("position")
    captions = [describe(rng.choice(position), rng) for _ in range(300)]
    used = {phrase for phrase in itertools.chain(*RELATION_PHRASES.values()) for text in captions
            if f" {phrase} " in text}
    assert len(used) >= 10


@pytest.mark.parametrize("caption, task, words", [
    ("a pink circle", "colors", ["pink"]),
    ("a red hexagon", "single_object", ["hexagon"]),
    ("five red stars", "counting", ["5 objects", "1 to 4"]),
    ("a red circle", "position", ["position", "to the left of"]),
    ("two red circles and a star", "counting", ["star", "outside an object"]),
    ("a red circle and a red square", "color_attr", ["differ"]),
    ("a red circle", "geneval", ["task"]),
])
def test_captions_the_world_cannot_draw_are_config_errors(caption, task, words):
    with pytest.raises(ConfigError) as error:
        parse(caption, task)
    assert all(word in str(error.value) for word in words), str(error.value)


def boxes_apart(layout) -> bool:
    return all(abs(a.x - b.x) >= (a.side + b.side) / 2 + GAP - 1e-9 or abs(a.y - b.y) >= (a.side + b.side) / 2 + GAP
               - 1e-9 for a, b in itertools.combinations(layout, 2))


@pytest.mark.parametrize("width, height", [(1, 1), (2.5, 1), (1, 1.6)])
def test_layouts_keep_apart_inside_and_in_relation(width, height):
    rng = random.Random(0)
    for task in TASKS:
        for request in rng.sample(all_requests(task), 20):
            layout = lay_out(request, width, height, rng)
            assert [placed.thing for placed in layout] == list(request.objects)
            assert boxes_apart(layout)
            for placed in layout:
                left, top, right, bottom = placed.box
                assert left >= MARGIN - 1e-9 and top >= MARGIN - 1e-9
                assert right <= width - MARGIN + 1e-9 and bottom <= height - MARGIN + 1e-9
            if request.relation:
                assert relations(layout[0].box, layout[1].box) == {request.relation}
    request = all_requests("counting")[-1]
    assert lay_out(request, 1, 1, random.Random(5)) == lay_out(request, 1, 1, random.Random(5))
    assert lay_out(request, 1, 1, random.Random(5)) != lay_out(request, 1, 1, random.Random(6))


def test_relations_follow_geneval():
    box = (0.4, 0.4, 0.6, 0.6)
    assert relations((0.0, 0.4, 0.2, 0.6), box) == {"left of"}
    assert relations((0.8, 0.45, 1.0, 0.65), box) == {"right of"}
    assert relations((0.4, 0.0, 0.6, 0.2), box) == {"above"}
    assert relations((0.8, 0.8, 1.0, 1.0), box) == {"right of", "below"}
    assert relations((0.45, 0.42, 0.65, 0.62), box) == set()  # overlapping: too close to tell


@pytest.mark.parametrize("resolution", [32, 64, (48, 96), (80, 40)])
def test_drawing_range_colours_and_anti_aliasing(resolution):
    request = Request("color_attr", (Thing("blue", "square"), Thing("red", "star")))
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    layout = lay_out(request, width / min(height, width), height / min(height, width), random.Random(1))
    image = draw(layout, resolution)
    assert image.shape == (3, height, width) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    pixels = ((image + 1) * 127.5).round().flatten(1).T  # [H*W, 3]
    assert (pixels[0] == torch.tensor(BACKGROUND)).all()
    for colour in ("blue", "red"):
        assert (pixels == torch.tensor(COLOURS[colour])).all(1).any()
    pure = (pixels == torch.tensor(BACKGROUND)).all(1) | (pixels == torch.tensor(COLOURS["blue"])).all(1) | (
        pixels == torch.tensor(COLOURS["red"])).all(1)
    assert (~pure).sum() > 8  # edges are blends


@pytest.mark.parametrize("shape", OBJECT_SHAPES)
def test_shapes_fill_their_box_as_designed(shape):
    """Coverage at a large size: area of the box and mass centre (up to a third lower for the triangle)."""
    offsets = torch.arange(-60, 60, dtype=torch.float64).numpy() + 0.5
    alpha = coverage(shape, offsets[None, :], offsets[:, None], 50.0)
    fill = alpha.sum() / 100**2
    expected = {"circle": torch.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
    assert fill == pytest.approx(expected.get(shape, 0.367), abs=0.01)
    assert alpha.max() == 1.0 and alpha.min() == 0.0
    drop = (alpha.sum(axis=1) * offsets).sum() / alpha.sum() / 50
    assert drop == pytest.approx(1 / 3 if shape == "triangle" else 0.0, abs=0.01)


def test_dataset_items_determinism_and_resolution():
    dataset = SyntheticCompositions(100, resolution=64, seed=0)
    item = dataset[7]
    assert set(item) == {"image", "caption"} and item["image"].shape == (3, 64, 64)
    again = SyntheticCompositions(100, resolution=64, seed=0)[7]
    assert torch.equal(item["image"], again["image"]) and item["caption"] == again["caption"]
    other = SyntheticCompositions(100, resolution=64, seed=1)
    assert sum(dataset[i]["caption"] == other[i]["caption"] for i in range(20)) <= 2
    dataset.resolution = 128  # same picture, twice the pixels
    large = dataset[7]
    assert large["caption"] == item["caption"]
    difference = (torch.nn.functional.avg_pool2d(large["image"][None], 2)[0] - item["image"]).abs()
    assert difference.mean() < 0.02
    assert dataset[(7, (32, 96))]["image"].shape == (3, 32, 96)
    captions = [dataset[i]["caption"] for i in range(100)]  # tasks of every form are drawn
    assert any(re.search(r"\b(two|three|four)\b", caption) for caption in captions)
    assert any(re.search(r"\b(left|right|above|below|over|under|beneath)\b", caption) for caption in captions)
    assert any(re.search(r"\band\b", caption) for caption in captions)


def test_heldout_requests_are_never_trained_per_task():
    heldout_keys = set()
    for task in TASKS:
        heldout = heldout_requests(task)
        keys = {request.key for request in heldout}
        assert heldout == heldout_requests(task) and heldout != heldout_requests(task, seed=1)
        assert all(request.task == task for request in heldout)
        assert len(keys) == round(0.1 * len({request.key for request in all_requests(task)}))
        training = SyntheticCompositions(8, tasks=(task,)).requests[task]
        assert keys.isdisjoint(request.key for request in training)
        # every colour, shape, count and relation of the task is still trained
        assert {thing.colour for request in training for thing in request.things} == set(COLOURS)
        assert {thing.shape for request in training for thing in request.things} == set(OBJECT_SHAPES)
        if task == "position":
            assert {request.relation for request in training} == set(RELATIONS)
        heldout_keys |= keys
    assert {r.key for r in heldout_requests("colors")} == {r.key for r in heldout_requests("single_object")}
    # the captions streamed for training and validation never ask for a held-out picture
    for split in ("train", "val"):
        dataset = SyntheticCompositions(400, resolution=8, seed=3, split=split)
        for i in range(len(dataset)):
            caption = dataset[i]["caption"]
            readings = []
            for task in TASKS:
                try:
                    readings.append(parse(caption, task).key)
                except ConfigError:
                    pass
            assert readings and heldout_keys.isdisjoint(readings), caption


def test_heldout_prompts_take_turns_over_tasks():
    prompts = HeldOutRequests(num_prompts=24, seed=0)
    assert [prompts[i]["task"] for i in range(6)] == list(TASKS)
    for i in range(24):
        item = prompts[i]
        assert set(item) == {"caption", "task", "request"}
        assert parse(item["request"], item["task"]) == prompts.requests[i] == parse(item["caption"], item["task"])
        assert prompts.requests[i] in heldout_requests(item["task"])
    subset = HeldOutRequests(num_prompts=4, tasks=("position", "counting"))
    assert [subset[i]["task"] for i in range(4)] == ["position", "counting"] * 2
    source = SyntheticShapesSource(world="compositional", num_test_prompts=12, tasks=["colors"])
    assert {prompt["task"] for prompt in source.test_prompts()} == {"colors"}


def test_source_config_errors_name_the_field_and_fix():
    field = "data.init_args.source.init_args"
    with pytest.raises(ConfigError, match=rf"{field}.world='geneval'.*one_object or compositional"):
        SyntheticShapesSource(world="geneval")
    with pytest.raises(ConfigError, match=rf"{field}.tasks=\['colours'\]"):
        SyntheticShapesSource(world="compositional", tasks=["colours"])
    with pytest.raises(ConfigError, match=rf"{field}.object_size=\[0.2, 0.4\] does not fit the 4 objects.*<= 0"):
        SyntheticShapesSource(world="compositional", object_size=(0.2, 0.4))
    SyntheticShapesSource(world="compositional", object_size=(0.2, 0.4), tasks=["colors", "position"])  # 2 fit
    with pytest.raises(ConfigError, match="compositional world"):
        SyntheticShapesSource(tasks=["colors"])
    with pytest.raises(ConfigError, match="keep"):
        SyntheticShapesSource(world="compositional", keep={"size": ["large"]})
    assert isinstance(SyntheticShapesSource().train_dataset(16).scenes, list)  # the one-object world by default


def test_data_speed():
    """The issue asks for 2,000 images/s at 64^2 on one core; a loaded test machine gets a looser bound."""
    dataset = SyntheticCompositions(10_000, resolution=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]
        start = time.perf_counter()
        for i in range(1000):
            dataset[i]
        speed = 1000 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert speed > 1000
