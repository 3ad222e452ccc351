"""A resolution curriculum as data: which resolution and batch size each training step uses, and a batch sampler
that serves it from one DataLoader for the whole run.

A ``Stage`` runs until ``until_step`` (exclusive) at one resolution or a weighted mix; in a mixed stage each
batch draws its resolution from a generator seeded by ``(seed, step)``, so the draw of a step does not depend on
what ran before it and a resumed run draws the same sequence. ``CurriculumBatchSampler`` yields, per step, a
batch of ``(index, (height, width))`` keys that the datasets (``SyntheticShapes``, ``RecordDataset``) render at
that size; its ``state_dict`` (step and position) makes ``--ckpt_path`` resume mid-stage.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import Sampler

from datamodules.buckets import bucket_sizes, nearest_bucket
from lit_dimba.errors import ConfigError


def draw(weights: list[float], seed: int, step: int, salt: int = 0) -> int:
    """Index drawn with probability proportional to ``weights`` from a generator seeded by (seed, step, salt)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + salt)
    return torch.multinomial(torch.tensor(weights, dtype=torch.float), 1, generator=generator).item()


@dataclass
class Stage:
    """Steps up to ``until_step`` (exclusive) at ``resolutions`` ({resolution: weight}, one entry for a single
    resolution) with ``batch_size`` per device (None: the DataModule's)."""

    until_step: int
    resolutions: dict[int, float] = field(default_factory=dict)
    batch_size: int | None = None


class ResolutionSchedule:
    """The (stage index, resolution, batch size) of every training step.

    Args:
        stages: in order of ``until_step``; the last stage also covers every later step.
        default_batch_size: the batch size of stages that do not set one.
        seed: seeds the per-step draws of mixed stages.
    """

    def __init__(self, stages: list[Stage], default_batch_size: int, seed: int = 0):
        if not stages:
            raise ConfigError("the resolution curriculum needs at least one stage")
        ends = [stage.until_step for stage in stages]
        if ends != sorted(ends) or len(set(ends)) != len(ends):
            raise ConfigError(f"curriculum stages must have increasing until_step, got {ends}")
        for i, stage in enumerate(stages):
            if not stage.resolutions or any(w < 0 for w in stage.resolutions.values()) or \
                    sum(stage.resolutions.values()) <= 0:
                raise ConfigError(f"curriculum stage {i}: resolutions must map resolutions to weights > 0, "
                                  f"e.g. {{512: 0.2, 1024: 0.8}}; got {stage.resolutions!r}")
        self.stages = stages
        self.default_batch_size = default_batch_size
        self.seed = seed

    def stage_index(self, step: int) -> int:
        return next((i for i, stage in enumerate(self.stages) if step < stage.until_step), len(self.stages) - 1)

    def at(self, step: int) -> tuple[int, int, int]:
        """(stage index, resolution, batch size) of training step ``step``."""
        index = self.stage_index(step)
        stage = self.stages[index]
        batch_size = stage.batch_size or self.default_batch_size
        resolutions = list(stage.resolutions)
        if len(resolutions) == 1:
            return index, int(resolutions[0]), batch_size
        choice = draw([float(stage.resolutions[r]) for r in resolutions], self.seed, step)
        return index, int(resolutions[choice]), batch_size

    def resolutions(self) -> list[int]:
        """Every resolution any stage uses."""
        return sorted({int(r) for stage in self.stages for r in stage.resolutions})


class ItemStream:
    """Items of a group (the whole data set, or one aspect bucket) in a new shuffled order each pass."""

    def __init__(self, members: list[int], seed: int):
        self.members = torch.tensor(members)
        self.seed = seed
        self._pass, self._order = -1, None

    def __call__(self, position: int) -> int:
        data_pass, offset = divmod(position, len(self.members))
        if data_pass != self._pass:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            self._pass, self._order = data_pass, self.members[torch.randperm(len(self.members), generator=generator)]
        return int(self._order[offset])


class CurriculumBatchSampler(Sampler[list[tuple[int, tuple[int, int]]]]):
    """Batches of ``(index, (height, width))`` keys following a ``ResolutionSchedule``.

    Items are drawn without replacement from shuffled passes over the data set; rank ``rank`` of ``num_replicas``
    takes every ``num_replicas``-th item, so ranks see disjoint items and, stepping in lock-step, the same number
    of batches of the same size. With ``image_sizes`` (each item's (height, width)) the batches use aspect-ratio
    buckets: at each step's resolution, the bucket table ``bucket_sizes(resolution, bucket_multiple,
    bucket_max_ratio)``, a bucket drawn (seeded by step) in proportion to its items, and items of that bucket.
    It yields batches up to ``max_steps`` (the Trainer stops there).
    """

    def __init__(self, length: int, schedule: ResolutionSchedule, max_steps: int, seed: int = 0, rank: int = 0,
                 num_replicas: int = 1, image_sizes: list[tuple[int, int]] | None = None, bucket_multiple: int = 32,
                 bucket_max_ratio: float = 2.0):
        self.schedule = schedule
        self.max_steps = max_steps
        self.seed = seed
        self.rank = rank
        self.num_replicas = num_replicas
        self.step = 0
        self.positions: dict[str, int] = {}  # items (over all ranks) consumed per stream
        self.streams = {"all": ItemStream(list(range(length)), seed)}
        self.tables: dict[int, list[tuple[int, int]]] = {}
        if image_sizes is not None:
            for resolution in schedule.resolutions():
                table = bucket_sizes(resolution, bucket_multiple, bucket_max_ratio)
                members: dict[int, list[int]] = {}
                for index, (h, w) in enumerate(image_sizes):
                    members.setdefault(nearest_bucket(h, w, table), []).append(index)
                self.tables[resolution] = table
                for bucket, items in members.items():
                    self.streams[f"{resolution}:{bucket}"] = ItemStream(items, seed)

    def _stream(self, resolution: int) -> tuple[str, tuple[int, int]]:
        """The stream this step draws from and its image size."""
        if not self.tables:
            return "all", (resolution, resolution)
        table = self.tables[resolution]
        names = [n for n in self.streams if n.startswith(f"{resolution}:")]
        name = names[draw([float(len(self.streams[n].members)) for n in names], self.seed, self.step, salt=7)]
        return name, table[int(name.split(":")[1])]

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        while self.step < self.max_steps:
            _, resolution, batch_size = self.schedule.at(self.step)
            name, size = self._stream(resolution)
            start = self.positions.get(name, 0) + self.rank
            keys = [(self.streams[name](start + k * self.num_replicas), size) for k in range(batch_size)]
            self.positions[name] = self.positions.get(name, 0) + batch_size * self.num_replicas
            self.step += 1
            yield keys

    def __len__(self) -> int:
        return max(self.max_steps - self.step, 0)

    def state_dict(self) -> dict:
        return {"step": self.step, "positions": dict(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.positions = dict(state["positions"])
