import itertools
import random
import re

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.synthetic import HeldOutPrompts, SyntheticShapes, heldout_scenes
from lit_dimba.scenes import BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_scenes, caption, render
from lit_dimba.scenes.captions import POSITION_PHRASES, SIZE_WORDS


def parse_caption(text: str) -> Scene:
    """Recover the scene from a caption, failing unless every attribute is named exactly once."""
    words = re.findall(r"[a-z]+", text)
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    sizes = [size for size, synonyms in SIZE_WORDS.items() for w in words if w in synonyms]
    found = [
        (phrase, position)
        for position, phrases in POSITION_PHRASES.items()
        for phrase in phrases
        if re.search(rf"\b{re.escape(phrase)}\b", text)
    ]
    # Drop phrases that only match inside a longer matched phrase ("centre" in "top centre").
    positions = {p for phrase, p in found if not any(phrase != longer and phrase in longer for longer, _ in found)}
    assert len(colours) == 1 and len(shapes) == 1 and len(sizes) == 1 and len(positions) == 1, text
    return Scene(colours[0], shapes[0], positions.pop(), sizes[0])


def to_rgb255(image: torch.Tensor) -> torch.Tensor:
    return ((image + 1) * 127.5).round()


def test_vocabulary():
    assert len(COLOURS) == 6 and len(SHAPES) == 3 and len(POSITIONS) == 9 and len(SIZES) == 2
    assert len(all_scenes()) == len(set(all_scenes())) == 324
    palette = [torch.tensor(rgb, dtype=torch.float32) for rgb in COLOURS.values()]
    background = torch.tensor(BACKGROUND, dtype=torch.float32)
    assert min((a - b).norm() for a, b in itertools.combinations(palette, 2)) > 120
    assert min((c - background).norm() for c in palette) > 150


@pytest.mark.parametrize(
    "field, value", [("colour", "pink"), ("shape", "star"), ("position", "middle"), ("size", "huge")]
)
def test_scene_rejects_unknown_values(field, value):
    values = {"colour": "red", "shape": "circle", "position": "top", "size": "small", field: value}
    with pytest.raises(ValueError, match=field) as error:
        Scene(**values)
    assert value in str(error.value)
    allowed = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "size": SIZES}[field]
    assert all(name in str(error.value) for name in allowed)


@pytest.mark.parametrize("resolution", [32, 64, 256, (24, 40), (40, 24)])
def test_render_shape_range_and_colours(resolution):
    scene = Scene("blue", "square", "center", "large")
    image = render(scene, resolution, random.Random(0))
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    assert image.shape == (3, height, width) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    pixels = to_rgb255(image).flatten(1).T  # [H*W, 3]
    assert (pixels[0] == torch.tensor(BACKGROUND)).all()  # corner is background
    assert (pixels == torch.tensor(COLOURS["blue"])).all(1).any()  # solid interior


def test_render_is_antialiased_and_deterministic():
    scene = Scene("red", "circle", "center", "small")
    first = render(scene, 32, random.Random(3))
    assert torch.equal(first, render(scene, 32, random.Random(3)))
    assert not torch.equal(first, render(scene, 32, random.Random(4)))  # jitter moves it
    pixels = to_rgb255(first).flatten(1).T
    pure = (pixels == torch.tensor(BACKGROUND)).all(1) | (pixels == torch.tensor(COLOURS["red"])).all(1)
    assert (~pure).sum() > 4  # edge pixels are blends


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_render_non_square_places_per_axis_without_stretching(shape, size):
    height, width = 30, 90
    for position in POSITIONS:
        image = render(Scene("green", shape, position, size), (height, width), random.Random(1))
        coverage = (to_rgb255(image) - torch.tensor(BACKGROUND)[:, None, None]).norm(dim=0) > 1
        ys, xs = torch.nonzero(coverage, as_tuple=True)
        row, col = divmod(POSITIONS.index(position), 3)
        assert int(3 * (ys.min() + ys.max() + 1) / 2 / height) == row
        assert int(3 * (xs.min() + xs.max() + 1) / 2 / width) == col
        box_height, box_width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert abs(box_height - box_width) <= 1  # sized from the shorter side, not stretched
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < height - 1 and xs.max() < width - 1


def test_caption_names_every_attribute_and_varies():
    rng = random.Random(0)
    scenes = all_scenes()
    phrasings, captions = set(), []
    for _ in range(200):
        scene = rng.choice(scenes)
        text = caption(scene, rng)
        assert parse_caption(text) == scene
        captions.append(text)
        # Replace attribute words by placeholders to compare the phrasing only.
        words = [scene.colour, scene.shape, *SIZE_WORDS[scene.size], *POSITION_PHRASES[scene.position]]
        for word in sorted(words, key=len, reverse=True):
            text = re.sub(rf"\b{re.escape(word)}\b", "<>", text)
        phrasings.add(re.sub(r"\b(a|an|one)\b", "<a>", text))
    assert len(phrasings) >= 6, phrasings
    assert len(set(captions)) > 150
    one_scene = Scene("purple", "triangle", "bottom right", "large")
    assert len({caption(one_scene, rng) for _ in range(100)}) >= 20
    assert not any(re.search(r"\ba [aeiou]", text) for text in captions)


def test_bad_resolution_is_rejected():
    scene = Scene("red", "circle", "top", "small")
    for bad in (0, -4, 32.0, "32", True, (32,), (32, 0), (32, 32, 3), None):
        with pytest.raises(ValueError, match="resolution"):
            render(scene, bad, random.Random(0))
        with pytest.raises(ValueError, match="resolution"):
            SyntheticShapes(4, resolution=bad)
    dataset = SyntheticShapes(4)
    with pytest.raises(ValueError, match="resolution"):
        dataset.resolution = -1
    assert dataset.resolution == 32


def test_dataset_arguments_are_validated():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, split="test")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="length"):
            SyntheticShapes(bad)
    with pytest.raises(IndexError):
        SyntheticShapes(4)[4]


def test_dataset_items_and_determinism():
    dataset = SyntheticShapes(100, resolution=32, seed=0)
    assert len(dataset) == 100
    item = dataset[7]
    assert set(item) == {"image", "caption"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1 and isinstance(item["caption"], str)

    again = SyntheticShapes(100, resolution=32, seed=0)[7]
    assert torch.equal(item["image"], again["image"]) and item["caption"] == again["caption"]
    assert torch.equal(dataset[7]["image"], item["image"])

    other_seed = SyntheticShapes(100, resolution=32, seed=1)
    val = SyntheticShapes(100, resolution=32, seed=0, split="val")
    for other in (other_seed, val):
        same = sum(torch.equal(dataset[i]["image"], other[i]["image"]) for i in range(20))
        assert same <= 2
        assert sum(dataset[i]["caption"] == other[i]["caption"] for i in range(20)) <= 2


def test_resolution_can_change_after_construction():
    dataset = SyntheticShapes(10, resolution=32)
    small = dataset[3]
    dataset.resolution = 64
    large = dataset[3]
    assert large["image"].shape == (3, 64, 64) and large["caption"] == small["caption"]
    # Same scene and jitter: downsampling the 64 px image gives nearly the 32 px one.
    downsampled = torch.nn.functional.avg_pool2d(large["image"][None], 2)[0]
    difference = (downsampled - small["image"]).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.3  # only anti-aliasing differs
    dataset.resolution = (16, 48)
    assert dataset[3]["image"].shape == (3, 16, 48)


def test_batches_collate():
    batch = next(iter(DataLoader(SyntheticShapes(8, resolution=(16, 24)), batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 24) and len(batch["caption"]) == 4


def test_heldout_scenes():
    heldout = heldout_scenes()
    assert heldout == heldout_scenes(0.1, seed=0)
    assert heldout != heldout_scenes(0.1, seed=1)
    assert len(heldout) == len(set(heldout)) == round(0.1 * 324)
    assert heldout_scenes(0.0) == []
    assert len(heldout_scenes(0.5)) == 162
    training = set(all_scenes()) - set(heldout)
    for field, values in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
        assert {getattr(s, field) for s in training} == set(values)
    for bad in (-0.1, 1.0, 0.99):
        with pytest.raises(ValueError, match="fraction"):
            heldout_scenes(bad)


def test_heldout_scenes_never_streamed():
    heldout = set(heldout_scenes())
    seen = set()
    for split, count in (("train", 2000), ("val", 1000)):
        dataset = SyntheticShapes(count, resolution=8, seed=3, split=split)
        assert heldout.isdisjoint(dataset.scenes) and len(dataset.scenes) == 324 - len(heldout)
        seen |= {parse_caption(dataset[i]["caption"]) for i in range(count)}
    assert heldout.isdisjoint(seen)
    assert len(seen) > 250  # the stream covers (nearly) all training combinations


def test_heldout_prompts():
    heldout = heldout_scenes()
    prompts = HeldOutPrompts(num_prompts=70, seed=0)
    assert len(prompts) == 70
    assert prompts.scenes == [heldout[i % len(heldout)] for i in range(70)]
    for i in (0, 33, 69):
        item = prompts[i]
        assert set(item) == {"caption", "colour", "shape", "position", "size"}
        assert all(isinstance(value, str) for value in item.values())
        assert Scene(item["colour"], item["shape"], item["position"], item["size"]) == prompts.scenes[i]
        assert parse_caption(item["caption"]) == prompts.scenes[i]
    assert [prompts[i] for i in range(70)] == [HeldOutPrompts(70, seed=0)[i] for i in range(70)]
    reseeded = HeldOutPrompts(70, seed=1)
    assert [prompts[i]["caption"] for i in range(70)] != [reseeded[i]["caption"] for i in range(70)]
    batch = next(iter(DataLoader(prompts, batch_size=5)))
    assert isinstance(batch["caption"], list) and batch["colour"] == [s.colour for s in prompts.scenes[:5]]
    with pytest.raises(ValueError, match="num_prompts"):
        HeldOutPrompts(0)
