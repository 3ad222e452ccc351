"""Reading objects back and scoring requests per GenEval task: ground truth, perturbed renders, wrong pictures, the
metric's per-task counts and the callback."""

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from callbacks import PromptFollowing
from datamodules import CaptionImageDataModule
from datamodules.synthetic import HeldOutRequests, SyntheticShapesSource
from lit_dimba.eval.prompt_following import PromptFollowingScore, batch_scenes, judge_requests
from lit_dimba.scenes import BACKGROUND
from lit_dimba.scenes.composition import CONVERSE, TASKS, Request, Thing, all_requests
from lit_dimba.scenes.detect import find_objects
from lit_dimba.scenes.draw import draw
from lit_dimba.scenes.layout import lay_out

KEYS = {*TASKS, "overall"}
BLANK = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 127.5 - 1


def render(requests: list[Request], resolution, seed: int = 0) -> torch.Tensor:
    """Ground-truth images [B, 3, H, W] of square requests."""
    rng = random.Random(seed)
    return torch.stack([draw(lay_out(request, 1, 1, rng), resolution) for request in requests])


def sample(per_task: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [rng.choice(requests) for requests in map(all_requests, TASKS) for _ in range(per_task)]


def scores(images: torch.Tensor, requests: list[Request]) -> dict[str, float]:
    metric = PromptFollowingScore()
    metric.update(images, requests)
    return {key: value.item() for key, value in metric.compute().items()}


@pytest.mark.parametrize("resolution", [48, 64, 128])  # 48: the demo's size (configs/world/compositional.yaml)
def test_ground_truth_scores_every_task(resolution):
    requests = sample(25 if resolution == 128 else 40)
    result = scores(render(requests, resolution), requests)
    assert set(result) == KEYS
    assert all(value >= 0.98 for value in result.values()), result


def test_objects_are_read_back_in_place():
    rng = random.Random(3)
    for request in sample(5, seed=3):
        layout = lay_out(request, 1, 1, rng)
        found = find_objects(draw(layout, 64))
        assert sorted((f.colour, f.shape) for f in found) == sorted((p.thing.colour, p.thing.shape) for p in layout)
        for placed in layout:  # each object's box, in pixels, is where it was drawn
            box = min((f for f in found if f.shape == placed.thing.shape and f.colour == placed.thing.colour),
                      key=lambda f: abs(f.box[0] - placed.box[0] * 64))
            assert max(abs(a - 64 * b) for a, b in zip(box.box, placed.box)) < 1.5


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images moved by (dy, dx) pixels, the uncovered border filled with its edge."""
    padded = F.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    height, width = images.shape[2:]
    return padded[..., max(-dy, 0):max(-dy, 0) + height, max(-dx, 0):max(-dx, 0) + width]


@pytest.mark.parametrize("resolution", [64, 128])
def test_reader_is_stable_under_blur_noise_and_shifts(resolution):
    requests = sample(15 if resolution == 64 else 8, seed=1)
    images = render(requests, resolution, seed=1)
    generator = torch.Generator().manual_seed(0)
    blur = 3 if resolution == 64 else 5
    perturbed = {
        "blur": F.avg_pool2d(images, blur, stride=1, padding=blur // 2, count_include_pad=False),
        "noise": (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1),
        "shift": torch.cat([shifted(images[:30], 1, -2), shifted(images[30:], -2, 1)]),
        "washed out": 0.6 * images + 0.4 * BLANK,
    }
    for name, changed in perturbed.items():
        result = scores(changed, requests)
        assert result["overall"] >= 0.97 and min(result.values()) >= 0.9, (name, result)


def test_wrong_pictures_fail_their_task():
    """Each image draws a request changed in what its task checks; the task must fail it, and tasks that do not
    check that change must still pass it."""
    rng = random.Random(0)
    red_star, blue_circle = Thing("red", "star"), Thing("blue", "circle")
    cases = [  # (asked, drawn, must fail, must pass)
        (Request("colors", (red_star,)), Request("colors", (Thing("green", "star"),)), "colors", "single_object"),
        (Request("single_object", (red_star,)), Request("single_object", (Thing("red", "cross"),)),
         "single_object", None),
        (Request("counting", (red_star,), 3), Request("counting", (red_star,), 4), "counting", None),
        (Request("counting", (red_star,), 3), Request("counting", (red_star,), 2), "counting", None),
        (Request("color_attr", (red_star, blue_circle)),
         Request("color_attr", (Thing("blue", "star"), Thing("red", "circle"))), "color_attr", "two_object"),
        (Request("two_object", (red_star, blue_circle)), Request("colors", (red_star,)), "two_object", None),
        *[(Request("position", (red_star, blue_circle), relation=relation),
           Request("position", (red_star, blue_circle), relation=CONVERSE[relation]), "position", "two_object")
          for relation in CONVERSE],
    ]
    for asked, drawn, fails, passes in cases:
        image = draw(lay_out(drawn, 1, 1, rng), 64)[None]
        as_task = lambda task: dataclasses.replace(asked, task=task, count=asked.count if task == "counting" else 1,
                                                   relation=asked.relation if task == "position" else None)
        assert not judge_requests(image, [as_task(fails)]).item(), (asked, drawn)
        if passes:
            assert judge_requests(image, [as_task(passes)]).item(), (asked, drawn)
    blank = BLANK.expand(1, 3, 64, 64)
    assert not judge_requests(blank.expand(len(TASKS), 3, 64, 64), sample(1)).any()
    assert find_objects(blank[0]) == []


def judged():
    """Six requests, one per task, drawn right, then the colors and position ones drawn wrong."""
    requests = sample(1, seed=4)
    wrong = [dataclasses.replace(requests[3], things=(Thing("purple" if requests[3].things[0].colour != "purple"
                                                            else "red", requests[3].things[0].shape),)),
             dataclasses.replace(requests[4], relation=CONVERSE[requests[4].relation])]
    images = torch.cat([render(requests, 64), render(wrong, 64)])
    return images, requests + [requests[3], requests[4]]


def test_metric_counts_per_task_and_averages_them():
    images, requests = judged()
    metric = PromptFollowingScore()
    metric.update(images[:4], requests[:4])
    metric.update(images[4:], requests[4:])
    assert metric.task_counts.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 1]]
    result = {key: value.item() for key, value in metric.compute().items()}
    assert result == pytest.approx({**dict.fromkeys(TASKS, 1.0), "colors": 0.5, "position": 0.5,
                                    "overall": 5 / 6})
    assert metric.total.item() == 0  # no one-object scenes judged: their scores are left out

    only_counting = PromptFollowingScore()
    only_counting.update(images[2:3], requests[2:3])
    assert set(only_counting.compute()) == {"counting", "overall"}  # overall: the mean over the tasks judged


def test_metric_reduces_task_counts_over_two_ranks():
    images, requests = judged()
    rank1 = PromptFollowingScore()
    rank1.update(images[6:], requests[6:])
    states = {tuple(value.shape): value for value in rank1.metric_state.values()}
    rank0 = PromptFollowingScore(dist_sync_fn=lambda tensor, group=None: [tensor, states[tuple(tensor.shape)]],
                                 distributed_available_fn=lambda: True)
    rank0.update(images[:6], requests[:6])
    assert rank0.compute()["overall"].item() == pytest.approx(5 / 6)
    assert rank0.task_counts[1].sum().item() == 6, "compute leaves the rank's own counts to accumulate on"


def test_prompts_carry_their_requests():
    prompts = HeldOutRequests(num_prompts=12)
    batch = next(iter(DataLoader(prompts, batch_size=12)))
    assert batch_scenes(batch) == prompts.requests


class StandInModel:
    """In place of a DiffusionModule: draws each prompt's request right, as a square image."""

    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def generate_batch(self, batch: dict) -> torch.Tensor:
        return render(batch_scenes(batch), int(batch["height"][0]))

    def log(self, name: str, value: torch.Tensor) -> None:
        self.logged[name] = value.item()


def test_callback_logs_every_task():
    datamodule = CaptionImageDataModule(SyntheticShapesSource(world="compositional", num_test_prompts=12),
                                        resolution=64)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=1)
    trainer = SimpleNamespace(sanity_checking=False, datamodule=datamodule, global_rank=0, world_size=1)
    model = StandInModel()
    PromptFollowing(num_prompts=12, batch_size=5).on_validation_epoch_end(trainer, model)
    assert set(model.logged) == {f"val/prompt_following/{key}" for key in KEYS}
    assert set(model.logged.values()) == {1.0}  # right drawings are read as right (12 prompts, two per task)
