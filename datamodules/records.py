"""From raw records (an image as bytes or a path, a caption) to training items, skipping bad input.

Real data sources (``datamodules.hf``, ``datamodules.webdataset``) yield *records*: dicts with an image in some
column (HF's ``{"bytes", "path"}``, raw bytes or a file path) and a caption. ``RecordDecoder`` turns one into an
item ``{"image": (3, H, W) in [-1, 1], "caption": str}`` or raises ``BadSample`` naming the record. The datasets
here skip a bad record, log it with its path (logger ``lit_dimba.data``) and count it in the next item's
``"skipped"`` field, which the training step sums into TensorBoard (``data/skipped``).
"""

import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from datamodules.buckets import resize_and_crop
from lit_dimba.errors import ConfigError

log = logging.getLogger("lit_dimba.data")
EmptyCaption = Literal["drop", "unconditional"]


class BadSample(Exception):
    """A record that cannot be used: ``where`` names it (file path or key), ``reason`` says why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def check_columns(available: Iterable[str], wanted: dict[str, Sequence[str]], source: str) -> None:
    """Raise a ConfigError if, for a field, none of its candidate columns exists; list the columns there are."""
    available = list(available)
    for field, candidates in wanted.items():
        if not any(c in available for c in candidates):
            raise ConfigError(f"{source} has no column {' or '.join(map(repr, candidates))} (data.source.{field}); "
                              f"its columns are {available}")


@dataclass
class RecordDecoder:
    """Decodes a record into an image and a caption.

    image_columns: candidate image columns, the first present non-empty one is used (webdataset samples may
        carry ``jpg`` or ``png``).
    caption_column: the caption column; ``caption_key`` picks a field when it holds JSON (webdataset ``.json``).
    empty_caption: a missing or blank caption makes the record a ``BadSample`` ("drop") or an unconditional
        sample with caption ``""`` ("unconditional"; the model then uses its null caption).
    root: folder that relative image paths are resolved against.
    """

    image_columns: Sequence[str]
    caption_column: str
    caption_key: str = "caption"
    empty_caption: EmptyCaption = "drop"
    root: str | None = None

    def name(self, record: dict) -> str:
        """A human-readable name of the record for error messages: its image path or its key."""
        for column in self.image_columns:
            value = record.get(column)
            if isinstance(value, dict) and value.get("path"):
                return str(value["path"])
            if isinstance(value, str):
                return value
        return str(record.get("__key__", record.get("__url__", "record")))

    def open(self, record: dict) -> Image.Image:
        """The record's image, opened lazily (header read, pixels not decoded yet); ``BadSample`` if absent."""
        where = self.name(record)
        value = next((record[c] for c in self.image_columns if record.get(c) is not None), None)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BadSample(where, f"no image in columns {list(self.image_columns)}")
        if isinstance(value, Image.Image):
            return value
        try:
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value))
            path = value if os.path.isabs(value) or self.root is None else os.path.join(self.root, value)
            if not os.path.isfile(path):
                raise BadSample(path, "image file does not exist")
            return Image.open(path)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise BadSample(where, f"cannot read the image ({error})") from error

    def image(self, record: dict) -> Image.Image:
        """The record's image decoded to RGB; ``BadSample`` if it is missing or corrupt."""
        image = self.open(record)
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise BadSample(self.name(record), f"cannot decode the image ({error})") from error

    def caption(self, record: dict) -> str:
        value = record.get(self.caption_column)
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str) and self.caption_column.endswith("json"):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise BadSample(self.name(record), f"caption column {self.caption_column!r} is not JSON") from error
        if isinstance(value, dict):
            value = value.get(self.caption_key)
        text = value.strip() if isinstance(value, str) else ""
        if not text and self.empty_caption == "drop":
            raise BadSample(self.name(record), f"empty or missing caption (column {self.caption_column!r}); set "
                            "data.source.empty_caption: unconditional to train it as an unconditional sample")
        return text

    def __call__(self, record: dict, size: tuple[int, int]) -> dict:
        """record -> ``{"image": (3, size[0], size[1]) in [-1, 1], "caption": str}``; raises ``BadSample``."""
        caption = self.caption(record)
        return {"image": resize_and_crop(self.image(record), size), "caption": caption}


def _skip(bad: BadSample) -> None:
    log.warning("skipped %s (%s)", bad.where, bad.reason)


class RecordDataset(Dataset):
    """Map-style items from indexable ``records``; a bad record is replaced by the next usable one.

    ``size_of(i)`` gives item i's (height, width) (one size, or its aspect bucket); a replacement must have the
    same size. After ``max_skip`` bad records in a row it stops with an error: the data is broken, not noisy.
    """

    def __init__(self, records: Sequence[dict], decode: RecordDecoder, size_of: Callable[[int], tuple[int, int]],
                 max_skip: int = 64):
        self.records = records
        self.decode = decode
        self.size_of = size_of
        self.max_skip = max_skip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, tuple[int, int]]) -> dict:
        """Item ``key`` at its size, or ``(index, (height, width))`` at that size (resolution curriculum)."""
        index, size = key if isinstance(key, tuple) else (key, self.size_of(key))
        skipped = 0
        j = index
        for _ in range(len(self)):
            if isinstance(key, tuple) or self.size_of(j) == size:
                try:
                    return {**self.decode(self.records[j], size), "skipped": skipped}
                except BadSample as bad:
                    _skip(bad)
                    skipped += 1
                    if skipped >= self.max_skip:
                        break
            j = (j + 1) % len(self)
        raise RuntimeError(f"{skipped} unusable records in a row from record {index} on (see the warnings above for "
                           "their paths); check the data source")


class RecordStream(IterableDataset):
    """Items from an iterable of records (streamed HF dataset, webdataset shards), skipping bad ones.

    ``records`` is re-iterated forever when ``repeat`` (streams have no length; training stops at
    ``trainer.max_steps``). Splitting over ranks and workers is the records' job (HF's ``split_dataset_by_node``,
    webdataset's node and worker splitters).
    """

    def __init__(self, records: Iterable[dict], decode: RecordDecoder, size: tuple[int, int], repeat: bool = True,
                 max_skip: int = 64):
        self.records = records
        self.decode = decode
        self.size = size
        self.repeat = repeat
        self.max_skip = max_skip

    def __iter__(self) -> Iterator[dict]:
        skipped = 0
        passes = 0
        while True:
            for record in self.records:
                try:
                    yield {**self.decode(record, self.size), "skipped": skipped}
                    skipped = 0
                except BadSample as bad:
                    _skip(bad)
                    skipped += 1
                    if skipped >= self.max_skip:
                        raise RuntimeError(f"{skipped} unusable records in a row (see the warnings above for "
                                           "their paths); check the data source") from bad
            if not self.repeat:
                return
            passes += 1
            if hasattr(self.records, "set_epoch"):  # a new shuffle of the shards each pass
                self.records.set_epoch(passes)

    def state_dict(self) -> dict:
        """The HF stream's position (``torchdata``'s StatefulDataLoader saves it for mid-epoch resume)."""
        return self.records.state_dict() if hasattr(self.records, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.records, "load_state_dict"):
            self.records.load_state_dict(state)
