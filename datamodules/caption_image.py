"""The one LightningDataModule of caption-image pairs, shared by the teacher, student and distillation modules.

A *source* provides the data; the DataModule owns resolution, batching, workers and seeds. A source
subclasses ``CaptionImageSource``:

- ``train_dataset(resolution) -> Dataset`` and ``val_dataset(resolution) -> Dataset`` whose items are
  ``{"image": (3, H, W) float in [-1, 1], "caption": str}``;
- ``test_prompts() -> list[dict]``: held-out prompts ``{"caption": str, ...}``, optionally with the scene
  attributes (``colour``, ``shape``, ``position``, ``size``) that the prompt-following score checks.

Test and predict batches are prompts, not images: ``{"caption", "index", "height", "width", ...}``.
"""

import os
from abc import ABC, abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lit_dimba.errors import ConfigError


class CaptionImageSource(ABC):
    """Where caption-image pairs come from; chosen in YAML by ``class_path``."""

    @abstractmethod
    def train_dataset(self, resolution: int) -> Dataset:
        """Items ``{"image": (3, resolution, resolution) float in [-1, 1], "caption": str}``."""

    @abstractmethod
    def val_dataset(self, resolution: int) -> Dataset:
        """Like ``train_dataset``, disjoint from it."""

    @abstractmethod
    def test_prompts(self) -> list[dict]:
        """Held-out prompts ``{"caption": str, ...}`` for ``test``."""


class PromptSet(Dataset):
    """Prompts to generate from: item i is the prompt dict plus ``index`` (its seed offset), ``height`` and ``width``."""

    def __init__(self, prompts: list[dict], resolution: int):
        self.prompts = prompts
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {**self.prompts[i], "index": i, "height": self.resolution, "width": self.resolution}


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


class CaptionImageDataModule(L.LightningDataModule):
    """Caption-image batches from a source at a given pixel resolution.

    Args:
        source: where images and captions come from (e.g. ``datamodules.SyntheticShapes``).
        resolution: square pixel resolution of training/validation images and of generated images.
        batch_size: per-device training batch; val_batch_size defaults to it.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle order.
        predict_prompts: a text file (one prompt per line) or a list of prompts for ``predict``.
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

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.source.train_dataset(self.resolution), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.source.val_dataset(self.resolution), self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(PromptSet(self.source.test_prompts(), self.resolution), self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_prompts is None:
            raise ConfigError("predict needs prompts: pass --data.predict_prompts FILE (one prompt per line)")
        prompts = self.predict_prompts
        if isinstance(prompts, str):
            prompts = read_prompt_file(prompts)
        return self._loader(PromptSet([{"caption": p} for p in prompts], self.resolution), self.val_batch_size,
                            shuffle=False)
