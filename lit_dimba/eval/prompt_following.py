"""The prompt-following score: how many generated images show what their prompt asked for.

Two worlds (``lit_dimba.scenes``), two kinds of prompt:

- a :class:`Scene` (one shape): ``judge`` reads each image back (``read_scene``) and compares it with its scene,
  attribute by attribute;
- a :class:`Request` (1 to 4 objects, in GenEval's six task types): ``follows`` checks the objects read back
  (``find_objects``) as GenEval checks its detections, and the score of a task is the share of its prompts
  followed; ``overall`` is the mean over the task types judged, as GenEval reports it.

``PromptFollowingScore`` sums those checks over batches as a ``torchmetrics.Metric``: its states are counts, so
under DDP/FSDP ``compute`` adds every rank's counts by itself and every rank gets the same score.
``DiffusionModule.test_step`` and the ``PromptFollowing`` callback both use it.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lit_dimba.scenes import ATTRIBUTES, Scene, read_scene
from lit_dimba.scenes.composition import TASKS, Request
from lit_dimba.scenes.detect import Found, find_objects
from lit_dimba.scenes.layout import relations
from lit_dimba.scenes.phrasing import parse

# The scores of scenes, in the order they are reported: each attribute, then "all" (colour, shape and position all
# right; size is reported but not required).
SCORES: tuple[str, ...] = (*ATTRIBUTES, "all")


def judge(images: torch.Tensor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Check each image against the scene its prompt described.

    Args:
        images: Tensor [B, 3, H, W], float in [-1, 1].
        scenes: B scenes, one per image.

    Returns:
        Bool tensors [B] under each key of ``SCORES``.
    """
    if images.ndim != 4 or len(images) != len(scenes):
        raise ValueError(
            f"need images [B, 3, H, W] and B scenes, got {tuple(images.shape)} and {len(scenes)} scenes"
        )
    readings = [read_scene(image) for image in images]
    correct = {
        key: torch.tensor([reading[key] == getattr(scene, key) for reading, scene in zip(readings, scenes)],
                          dtype=torch.bool)
        for key in ATTRIBUTES
    }
    correct["all"] = correct["colour"] & correct["shape"] & correct["position"]
    return correct


def follows(request: Request, objects: list[Found]) -> bool:
    """Whether the objects read from an image (largest first) show what ``request`` asks, by GenEval's rules: the
    largest objects of each asked shape stand for it; only counting checks that no more are there.

    - single_object / two_object: an object of each asked shape;
    - counting: exactly ``count`` objects of the shape;
    - colors / color_attr: the largest object of each asked shape has the asked colour;
    - position: the largest objects of the two shapes lie in ``relation`` (``layout.relations``).
    """
    largest = {}
    for found in objects:
        largest.setdefault(found.shape, found)
    present = [largest.get(thing.shape) for thing in request.things]
    if request.task == "counting":
        return sum(found.shape == request.things[0].shape for found in objects) == request.count
    if any(found is None for found in present):
        return False
    if request.task in ("colors", "color_attr"):
        return all(found.colour == thing.colour for found, thing in zip(present, request.things))
    if request.task == "position":
        return request.relation in relations(present[0].box, present[1].box)
    return True


def judge_requests(images: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Whether each image [B, 3, H, W] in [-1, 1] follows its request: Bool tensor [B]."""
    if images.ndim != 4 or len(images) != len(requests):
        raise ValueError(
            f"need images [B, 3, H, W] and B requests, got {tuple(images.shape)} and {len(requests)} requests"
        )
    return torch.tensor([follows(request, find_objects(image)) for image, request in zip(images, requests)],
                        dtype=torch.bool)


def batch_scenes(batch: dict) -> list[Scene] | list[Request] | None:
    """What each prompt of a collated batch asks for: scenes (``{"caption": [B], "colour": [B], ...}``) or requests
    (``{"caption": [B], "task": [B], "request": [B]}``, where ``request`` is the plain wording of the request,
    ``phrasing.plain``), or None when the prompts carry neither (prompts of other data than the synthetic source's)."""
    if "task" in batch and "request" in batch:
        return [parse(text, task) for text, task in zip(batch["request"], batch["task"])]
    if not all(key in batch for key in ATTRIBUTES):
        return None
    return [Scene(*values) for values in zip(*(batch[key] for key in ATTRIBUTES))]


def scored(batch: dict) -> list[bool]:
    """Which items of a collated prompt batch count: all, except the padding that gives every rank as many batches
    (``"scored": False``, ``datamodules.caption_image.PromptShare``)."""
    flags = batch.get("scored")
    return [bool(flag) for flag in flags] if flags is not None else [True] * len(batch["caption"])


class PromptFollowingScore(Metric):
    """Share of prompts followed: for scenes, the share right in each attribute and in all of colour, shape and
    position; for requests, the share followed per task type and ``overall``, their mean.

    States (summed over updates, and over ranks by ``compute``), int64 counts: ``correct`` [len(SCORES)], the
    scenes right in each score, and ``total`` [], the scenes judged; ``task_counts`` [2, len(TASKS)], the requests
    followed (row 0) and judged (row 1) per task. Integer counts keep the sums exact and are left alone when the
    module holding the metric is cast to bf16.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(len(SCORES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("task_counts", torch.zeros(2, len(TASKS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, scenes: list[Scene] | list[Request]) -> None:
        """Judge images [B, 3, H, W] in [-1, 1] against their B scenes or B requests (B may be 0)."""
        if scenes and isinstance(scenes[0], Request):
            followed = judge_requests(images, scenes)
            tasks = torch.tensor([TASKS.index(request.task) for request in scenes])
            counts = torch.stack([torch.bincount(tasks[followed], minlength=len(TASKS)),
                                  torch.bincount(tasks, minlength=len(TASKS))])
            self.task_counts += counts.to(self.task_counts)
            return
        correct = judge(images, scenes)
        self.correct += torch.stack([correct[key].sum() for key in SCORES]).to(self.correct)
        self.total += len(scenes)

    def compute(self) -> dict[str, torch.Tensor]:
        """Fraction right under each key of ``SCORES`` when scenes were judged, and followed under each task judged
        and ``overall`` when requests were (float32 scalars); empty when nothing was judged."""
        scores = {}
        if self.total > 0:
            scores.update(zip(SCORES, self.correct.float() / self.total))
        followed, judged = self.task_counts
        tasks = {task: followed[i].float() / judged[i] for i, task in enumerate(TASKS) if judged[i] > 0}
        if tasks:
            scores.update(tasks, overall=torch.stack(list(tasks.values())).mean())
        return scores
