import dataclasses
import random
import time

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic import heldout_scenes
from lit_dimba.eval.prompt_following import judge, summarise
from lit_dimba.scenes import BACKGROUND, COLOURS, Scene, all_scenes, read_scene, render

KEYS = {"colour", "shape", "position", "size", "all"}


def ground_truth(resolution, count: int = 200, seed: int = 0):
    """Every combination (held-out ones included) once, plus ``count`` random scenes; random jitter."""
    rng = random.Random(seed)
    scenes = all_scenes() + [rng.choice(all_scenes()) for _ in range(count)]
    assert set(heldout_scenes()) <= set(scenes)
    return torch.stack([render(scene, resolution, rng) for scene in scenes]), scenes


@pytest.mark.parametrize("resolution", [32, 64, (32, 48)])
def test_ground_truth_scores(resolution):
    images, scenes = ground_truth(resolution)
    start = time.perf_counter()
    correct = judge(images, scenes)
    per_image_ms = 1000 * (time.perf_counter() - start) / len(scenes)
    scores = summarise(correct)
    print(f"\nground truth at {resolution}: {scores}, {per_image_ms:.2f} ms per image")
    assert set(scores) == KEYS
    assert all(score >= 0.98 for score in scores.values()), scores
    if resolution == 32:
        assert per_image_ms < 5


def test_large_images_are_read():
    rng = random.Random(5)
    scenes = [rng.choice(all_scenes()) for _ in range(20)]
    images = torch.stack([render(scene, 256, rng) for scene in scenes])
    assert summarise(judge(images, scenes))["all"] == 1.0


@pytest.mark.parametrize("resolution", [32, 64])
def test_noise_and_blur_robustness(resolution):
    images, scenes = ground_truth(resolution, count=0)
    generator = torch.Generator().manual_seed(0)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    noisy_scores = summarise(judge(noisy, scenes))
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blurred_scores = summarise(judge(blurred, scenes))
    print(f"\nnoise 0.1 at {resolution}: {noisy_scores}\n3x3 blur at {resolution}: {blurred_scores}")
    assert noisy_scores["colour"] >= 0.95 and noisy_scores["all"] >= 0.9
    assert blurred_scores["all"] >= 0.95
    # A washed-out shape (60% colour, 40% background) keeps its hue.
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
    washed = 0.6 * images + 0.4 * background
    assert summarise(judge(washed, scenes))["colour"] >= 0.95


def test_blank_images_read_as_nothing():
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
    blank = background.expand(3, 32, 32)
    assert read_scene(blank) == dict.fromkeys(["colour", "shape", "position", "size"])
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([blank, torch.zeros(3, 32, 32), -torch.ones(3, 32, 32)])
    images = torch.cat([images, (blank + 0.1 * torch.randn(3, 3, 32, 32, generator=generator)).clamp(-1, 1)])
    correct = judge(images, [Scene("red", "circle", "center", "small")] * len(images))
    assert not any(value.any() for value in correct.values())


def test_wrong_colour_is_caught():
    rng = random.Random(2)
    names = list(COLOURS)
    scenes = [rng.choice(all_scenes()) for _ in range(60)]
    # Draw each scene in another colour, cycling through all five wrong ones.
    drawn = [
        dataclasses.replace(s, colour=names[(names.index(s.colour) + 1 + i % 5) % 6]) for i, s in enumerate(scenes)
    ]
    images = torch.stack([render(scene, 32, rng) for scene in drawn])
    correct = judge(images, scenes)
    assert not correct["colour"].any() and not correct["all"].any()
    assert correct["shape"].all() and correct["position"].all() and correct["size"].all()


def test_wrong_shape_position_and_size_are_caught():
    scene = Scene("yellow", "circle", "top left", "small")
    rng = random.Random(0)
    changes = (("shape", "square"), ("shape", "triangle"), ("position", "bottom right"), ("size", "large"))
    for attribute, value in changes:
        image = render(dataclasses.replace(scene, **{attribute: value}), 32, rng)
        correct = judge(image[None], [scene])
        assert not correct[attribute].item()
        assert correct["all"].item() == (attribute == "size")


def test_api_contract():
    rng = random.Random(0)
    scenes = [Scene("cyan", "triangle", "bottom", "large"), Scene("red", "square", "left", "small")]
    images = torch.stack([render(scene, 32, rng) for scene in scenes])
    assert read_scene(images[0]) == dataclasses.asdict(scenes[0])
    correct = judge(images, scenes)
    assert set(correct) == KEYS
    assert all(value.dtype == torch.bool and value.shape == (2,) for value in correct.values())
    scores = summarise(correct)
    assert scores == {key: 1.0 for key in KEYS} and all(isinstance(v, float) for v in scores.values())
    with pytest.raises(ValueError):
        judge(images, scenes[:1])
    with pytest.raises(ValueError):
        read_scene(images)
