import dataclasses
import random
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from callbacks import PromptFollowing
from datamodules import CaptionImageDataModule
from datamodules.caption_image import PromptSet, PromptShare
from datamodules.synthetic import HeldOutPrompts, SyntheticShapesSource, heldout_scenes
from lit_dimba.modules import DiffusionModule
from lit_dimba.eval.prompt_following import PromptFollowingScore, batch_scenes, judge
from lit_dimba.scenes import BACKGROUND, COLOURS, Scene, all_scenes, read_scene, render

KEYS = {"colour", "shape", "position", "size", "all"}


def summarise(images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """The fraction of images right per score, through the metric."""
    score = PromptFollowingScore()
    score.update(images, scenes)
    return {key: value.item() for key, value in score.compute().items()}


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
    scores = summarise(images, scenes)
    per_image_ms = 1000 * (time.perf_counter() - start) / len(scenes)
    assert set(scores) == KEYS
    assert all(score >= 0.98 for score in scores.values()), scores
    if resolution == 32:  # a gross slow-down only: the machine may be busy
        assert per_image_ms < 20


def test_large_images_are_read():
    rng = random.Random(5)
    scenes = [rng.choice(all_scenes()) for _ in range(20)]
    images = torch.stack([render(scene, 256, rng) for scene in scenes])
    assert summarise(images, scenes)["all"] == 1.0


@pytest.mark.parametrize("resolution", [32, 64])
def test_noise_and_blur_robustness(resolution):
    images, scenes = ground_truth(resolution, count=0)
    generator = torch.Generator().manual_seed(0)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    noisy_scores = summarise(noisy, scenes)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blurred_scores = summarise(blurred, scenes)
    assert noisy_scores["colour"] >= 0.95 and noisy_scores["all"] >= 0.9
    assert blurred_scores["all"] >= 0.95
    # A washed-out shape (60% colour, 40% background) keeps its hue.
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
    washed = 0.6 * images + 0.4 * background
    assert summarise(washed, scenes)["colour"] >= 0.95


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
    assert summarise(images, scenes) == {key: 1.0 for key in KEYS}
    with pytest.raises(ValueError):
        judge(images, scenes[:1])
    with pytest.raises(ValueError):
        read_scene(images)


def judged_images(resolution: int = 32):
    """Five renders and the scenes asked for: images 0-2 right, 3 drawn in the wrong colour, 4 in the wrong shape
    and size."""
    rng = random.Random(0)
    asked = [Scene("red", "circle", "center", "large"), Scene("blue", "square", "top left", "large"),
             Scene("green", "triangle", "bottom", "large"), Scene("cyan", "square", "right", "large"),
             Scene("yellow", "circle", "left", "large")]
    drawn = asked[:3] + [dataclasses.replace(asked[3], colour="purple"),
                         dataclasses.replace(asked[4], shape="triangle", size="small")]
    return torch.stack([render(scene, resolution, rng) for scene in drawn]), asked


# colour, shape, position, size, all of judged_images()
EXPECTED = {"colour": 4 / 5, "shape": 4 / 5, "position": 1.0, "size": 4 / 5, "all": 3 / 5}


def test_metric_accumulates_over_batches():
    images, scenes = judged_images()
    score = PromptFollowingScore()
    assert score.correct.dtype == score.total.dtype == torch.long
    score.update(images[:2], scenes[:2])
    score.update(images[2:2], scenes[2:2])  # an empty batch counts nothing
    score.update(images[2:], scenes[2:])
    assert score.total.item() == 5 and score.correct.tolist() == [4, 4, 5, 4, 3]
    assert {key: value.item() for key, value in score.compute().items()} == pytest.approx(EXPECTED)
    score.reset()
    assert score.total.item() == 0 and score.compute() == {}


def gather_from(other: PromptFollowingScore):
    """A stand-in for ``torch.distributed``'s all_gather between two ranks: this rank's state, then ``other``'s
    state of the same shape (``correct`` [5] and ``total`` [] differ in shape)."""
    states = {tuple(value.shape): value for value in other.metric_state.values()}
    return lambda tensor, group=None: [tensor, states[tuple(tensor.shape)]]


def test_metric_reduces_over_two_ranks():
    images, scenes = judged_images()
    rank1 = PromptFollowingScore()
    rank1.update(images[3:], scenes[3:])  # both wrong images on rank 1
    rank0 = PromptFollowingScore(dist_sync_fn=gather_from(rank1), distributed_available_fn=lambda: True)
    rank0.update(images[:3], scenes[:3])
    assert {key: value.item() for key, value in rank1.compute().items()}["all"] == 0.0  # rank 1 alone
    assert {key: value.item() for key, value in rank0.compute().items()} == pytest.approx(EXPECTED)
    assert rank0.total.item() == 3, "compute leaves the rank's own counts to accumulate on"

    merged = PromptFollowingScore()
    merged.merge_state(rank0)
    merged.merge_state(rank1)
    assert merged.correct.tolist() == [4, 4, 5, 4, 3] and merged.total.item() == 5


def test_metric_counts_stay_integers_when_the_module_is_cast():
    images, scenes = judged_images()
    module = torch.nn.Module()
    module.score = PromptFollowingScore()
    module.to(torch.bfloat16)
    for _ in range(200):  # 1000 images: float counts in bf16 would stop at 256
        module.score.update(images, scenes)
    assert module.score.total.item() == 1000 and module.score.correct.tolist() == [800, 800, 1000, 800, 600]


def test_prompts_of_the_synthetic_source_carry_their_scenes():
    prompts = HeldOutPrompts(num_prompts=6)
    batch = next(iter(DataLoader(prompts, batch_size=6)))
    assert batch_scenes(batch) == prompts.scenes
    assert batch_scenes({"caption": ["a red circle"], "index": torch.tensor([0])}) is None


class StandInModel:
    """In place of a DiffusionModule: draws prompt 0 right and every other prompt as a blank image; records the
    prompt indices it generated and what was logged."""

    device = torch.device("cpu")

    def __init__(self, resolution: int):
        self.resolution = resolution
        self.generated, self.logged = [], {}

    def generate_batch(self, batch: dict) -> torch.Tensor:
        blank = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1
        images = [render(scene, self.resolution, random.Random(0)) if index == 0
                  else blank.expand(3, self.resolution, self.resolution)
                  for index, scene in zip(batch["index"].tolist(), batch_scenes(batch))]
        self.generated += batch["index"].tolist()
        return torch.stack(images)

    def log(self, name: str, value: torch.Tensor) -> None:
        self.logged[name] = value.item()


def ranked_datamodule(num_prompts: int, rank: int, world_size: int) -> CaptionImageDataModule:
    """The demo's data module at 32^2 as rank ``rank`` of ``world_size`` sees it."""
    datamodule = CaptionImageDataModule(SyntheticShapesSource(num_test_prompts=num_prompts), resolution=32)
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return datamodule


def test_prompt_share_gives_every_prompt_once_and_every_rank_as_many():
    """7 prompts on 3 ranks: shares of 3 (0 3 6 / 1 4 pad / 2 5 pad); the padding repeats prompt 0 unscored."""
    prompts = PromptSet([{"caption": f"prompt {i}"} for i in range(7)], 32)
    shares = [[prompts[i] for i in PromptShare(prompts, 3, rank)] for rank in range(3)]
    assert [len(share) for share in shares] == [3, 3, 3]
    scored = sorted(item["index"] for share in shares for item in share if item["scored"])
    assert scored == list(range(7))
    pads = [item for share in shares for item in share if not item["scored"]]
    assert [(pad["index"], pad["caption"]) for pad in pads] == [(0, "prompt 0")] * 2


def test_test_step_scores_each_prompt_once_over_ranks():
    """The test loaders of 2 ranks over 3 prompts: the scores' counts summed over the ranks are the counts of one
    rank that tests all 3; the padding is neither scored nor kept in the test grid."""
    def run(rank: int, world_size: int) -> SimpleNamespace:
        model = StandInModel(32)
        model.test_score, model._test_images, model._test_captions = PromptFollowingScore(), [], []
        for batch in ranked_datamodule(3, rank, world_size).test_dataloader():
            DiffusionModule.test_step(model, batch, 0)
        return model

    alone, ranks = run(0, 1), [run(rank, 2) for rank in range(2)]
    assert [model.generated for model in ranks] == [[0, 2], [1, 0]]  # rank 1 pads with prompt 0
    assert sum(len(model._test_captions) for model in ranks) == 3 == len(alone._test_captions)
    assert torch.equal(ranks[0].test_score.correct + ranks[1].test_score.correct, alone.test_score.correct)
    assert ranks[1].test_score.total + ranks[0].test_score.total == alone.test_score.total == 3


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_callback_splits_prompts_over_ranks_and_scores_no_padding(batch_size):
    """3 prompts on 2 ranks: rank 0 gets prompts 0 and 2, rank 1 prompt 1 plus a repeat of prompt 0 (so that both
    run as many batches). Only prompt 0 is drawn right: rank 1 must score 0, not count the repeat."""
    models = [StandInModel(32), StandInModel(32)]
    for rank, model in enumerate(models):
        trainer = SimpleNamespace(sanity_checking=False, datamodule=ranked_datamodule(3, rank, 2), global_rank=rank,
                                  world_size=2)
        PromptFollowing(num_prompts=3, batch_size=batch_size).on_validation_epoch_end(trainer, model)
    assert [model.generated for model in models] == [[0, 2], [1, 0]]
    assert models[0].logged == {f"val/prompt_following/{key}": 0.5 for key in KEYS}
    assert models[1].logged == {f"val/prompt_following/{key}": 0.0 for key in KEYS}


def test_callback_logs_nothing_for_prompts_without_scenes():
    datamodule = ranked_datamodule(2, 0, 1)
    datamodule.source = SimpleNamespace(test_prompts=lambda: [{"caption": "a cat"}, {"caption": "a dog"}])
    trainer = SimpleNamespace(sanity_checking=False, datamodule=datamodule, global_rank=0, world_size=1)
    model = StandInModel(32)
    PromptFollowing(num_prompts=2).on_validation_epoch_end(trainer, model)
    assert model.generated == [] and model.logged == {}
