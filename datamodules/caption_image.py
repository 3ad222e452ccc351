"""The one LightningDataModule of caption-image pairs, shared by the teacher, student and distillation modules.

A *source* provides the data; the DataModule owns resolution, batching, workers and seeds. A source
subclasses ``CaptionImageSource``:

- ``train_dataset(resolution, rank, world_size) -> Dataset`` and ``val_dataset(resolution) -> Dataset`` whose
  items are ``{"image": (3, H, W) float in [-1, 1], "caption": str}``, plus ``"skipped"`` (bad records passed
  over before this one) from the real-data sources; an empty caption means an unconditional sample. A
  map-style training set is split over ranks by Lightning's sampler; a stream splits itself by ``rank``;
- ``test_prompts() -> list[dict]``: held-out prompts ``{"caption": str, ...}``, optionally with the scene
  attributes (``colour``, ``shape``, ``position``, ``size``) that the prompt-following score checks;
- ``encoders(module)``: what turns its training batches into latents and text features: the module's frozen
  encoders (``FrozenEncoders``), unless its batches are already encoded (``datamodules.cache``).

Test and predict batches are prompts, not images: ``{"caption", "index", "height", "width", ...}``.

The training loader is torchdata's ``StatefulDataLoader``: Lightning saves its position in every checkpoint, so
``--ckpt_path`` resumes mid-epoch with the batch the next step would have seen.
"""

import os
from abc import ABC, abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.buckets import BucketBatchSampler, bucket_sizes
from datamodules.curriculum import CurriculumBatchSampler, ResolutionSchedule
from lit_dimba.conditioning.encoders import BatchEncoders, FrozenEncoders
from lit_dimba.errors import ConfigError


class CaptionImageSource(ABC):
    """Where caption-image pairs come from; chosen in YAML by ``class_path``."""

    @abstractmethod
    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> Dataset:
        """Items ``{"image": (3, resolution, resolution) float in [-1, 1], "caption": str}``; an iterable
        dataset yields only rank ``rank`` of ``world_size``'s share. With ``buckets`` (a table of (height, width)
        sizes) each item is resized and cropped to its nearest bucket instead, and the dataset has ``bucket_of``
        (the bucket index of each item); sources that cannot do this raise a ConfigError."""

    @abstractmethod
    def val_dataset(self, resolution: int) -> Dataset:
        """Like ``train_dataset``, disjoint from it."""

    @abstractmethod
    def test_prompts(self) -> list[dict]:
        """Held-out prompts ``{"caption": str, ...}`` for ``test``."""

    def encoders(self, module) -> BatchEncoders:
        """The module's frozen text encoder and VAE, which this source's images and captions need."""
        module.require_text_encoder(f"data.source {type(self).__name__} gives captions, not cached features")
        return FrozenEncoders(module.text_encoder, module.vae)


class PromptSet(Dataset):
    """Prompts to generate from: item i is the prompt dict plus ``index`` (its seed offset), ``height``, ``width`` and
    ``scored`` (True). Index ``len(prompts)`` is the padding ``PromptShare`` uses: the first prompt again, with
    ``scored`` False (generated, as every rank must run as many batches, but neither scored nor written)."""

    def __init__(self, prompts: list[dict], resolution: int):
        self.prompts = prompts
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        pad = i == len(self.prompts)
        return {**self.prompts[0 if pad else i], "index": 0 if pad else i, "height": self.resolution,
                "width": self.resolution, "scored": not pad}


class PromptShare(DistributedSampler):
    """One rank's share of a ``PromptSet`` for test, predict and the prompt-following score: prompts ``rank, rank +
    world_size, ...`` in order, padded to the same count on every rank with the padding index (a repeat that is not
    scored; ``PromptSet``). So every rank runs the same number of sampling batches (under FSDP each denoising step is
    a collective) and, unlike Lightning's ``DistributedSampler``, which pads with real prompts, no prompt is scored
    twice. Being a ``DistributedSampler``, Lightning leaves it in place.
    """

    def __init__(self, prompts: PromptSet, world_size: int = 1, rank: int = 0):
        super().__init__(prompts, num_replicas=world_size, rank=rank, shuffle=False)

    def __iter__(self):
        share = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(share + [len(self.dataset)] * (self.num_samples - len(share)))


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompt file {path!r} does not exist; pass a text file with one prompt per line "
                          "(data.predict_prompts)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path!r} has no prompts; write one prompt per line")
    return prompts


def check_usable(dataset: Dataset) -> None:
    """Stop before training when the first training item cannot be produced (e.g. every image is unreadable)."""
    try:
        first = dataset[0] if not isinstance(dataset, IterableDataset) else next(iter(dataset), None)
    except RuntimeError as error:
        raise ConfigError(f"the training data has no usable samples at its start: {error}") from error
    if first is None:
        raise ConfigError("the training data is empty; check data.source")


class CaptionImageDataModule(L.LightningDataModule):
    """Caption-image batches from a source at a given pixel resolution.

    Args:
        source: where images and captions come from (e.g. ``datamodules.SyntheticShapes``).
        resolution: square pixel resolution of training/validation images and of generated images.
        batch_size: per-device training batch; val_batch_size defaults to it.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle order.
        predict_prompts: a text file (one prompt per line) or a list of prompts for ``predict``.
        buckets: train on aspect-ratio buckets of about ``resolution``^2 pixels (sizes multiples of
            ``bucket_multiple``, which must be a multiple of the VAE factor x patch size; long/short side at most
            ``bucket_max_ratio``) instead of square crops. Every batch holds one bucket and every rank gets the same
            number of batches; with several devices set ``trainer.use_distributed_sampler: false`` (the bucket
            sampler splits the batches over ranks itself).
    """

    def __init__(
        self,
        source: CaptionImageSource,
        resolution: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        predict_prompts: str | list[str] | None = None,
        buckets: bool = False,
        bucket_multiple: int = 32,
        bucket_max_ratio: float = 2.0,
    ):
        super().__init__()
        if not isinstance(resolution, int) or resolution <= 0:
            raise ConfigError(f"data.resolution must be a positive integer, got {resolution!r}")
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.predict_prompts = predict_prompts
        self.buckets = bucket_sizes(resolution, bucket_multiple, bucket_max_ratio) if buckets else None
        self.bucket_multiple = bucket_multiple
        self.bucket_max_ratio = bucket_max_ratio
        self.schedule: ResolutionSchedule | None = None  # set by callbacks.ResolutionCurriculum

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, loader=DataLoader, rank: int = 0,
                world_size: int = 1) -> DataLoader:
        shuffle = shuffle and not isinstance(dataset, IterableDataset)  # streams shuffle themselves
        if shuffle and world_size > 1:
            # Each rank's share and order are a function of (seed, epoch), so --ckpt_path resumes mid-epoch exactly;
            # the sampler Lightning would put around a shuffled loader re-draws its wrapped permutation when the
            # resumed loader replays it, and continues with other items.
            order = dict(sampler=DistributedSampler(dataset, world_size, rank, shuffle=True, seed=self.seed,
                                                    drop_last=True))
        else:
            order = dict(shuffle=shuffle, generator=torch.Generator().manual_seed(self.seed) if shuffle else None)
        return loader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, drop_last=shuffle, **order)

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled batches of ``resolution``; with buckets, single-bucket batches; with a curriculum schedule, one
        loader for every stage whose batches carry their own size (and bucket at that stage's resolution)."""
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        dataset = self.source.train_dataset(self.resolution, rank=rank, world_size=world_size, buckets=self.buckets)
        if self.schedule is not None and isinstance(dataset, IterableDataset):
            raise ConfigError("the resolution curriculum needs a map-style source (not a stream): the sampler picks "
                              "each batch's items and size")
        check_usable(dataset)
        if self.schedule is not None:
            sizes = dataset.image_sizes if self.buckets is not None else None
            batch_sampler = CurriculumBatchSampler(len(dataset), self.schedule, self.trainer.max_steps, self.seed,
                                                   rank, world_size, sizes, self.bucket_multiple,
                                                   self.bucket_max_ratio)
        elif self.buckets is not None:
            batch_sampler = BucketBatchSampler(dataset.bucket_of, self.batch_size, world_size, rank, self.seed)
        else:
            return self._loader(dataset, self.batch_size, shuffle=True, loader=StatefulDataLoader, rank=rank,
                                world_size=world_size)
        return StatefulDataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                                  persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.source.val_dataset(self.resolution), self.val_batch_size, shuffle=False)

    def prompt_loader(self, prompts: list[dict], batch_size: int | None = None) -> DataLoader:
        """This rank's share of ``prompts`` (``PromptShare``) at ``resolution``, in batches of ``batch_size``
        (default ``val_batch_size``)."""
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        dataset = PromptSet(prompts, self.resolution)  # prompts are text: no workers needed
        return DataLoader(dataset, batch_size=batch_size or self.val_batch_size,
                          sampler=PromptShare(dataset, world_size, rank))

    def test_dataloader(self) -> DataLoader:
        return self.prompt_loader(self.source.test_prompts())

    def predict_dataloader(self) -> DataLoader:
        if self.predict_prompts is None:
            raise ConfigError("predict needs prompts: pass --data.predict_prompts FILE (one prompt per line)")
        prompts = self.predict_prompts
        if isinstance(prompts, str):
            prompts = read_prompt_file(prompts)
        return self.prompt_loader([{"caption": p} for p in prompts])
