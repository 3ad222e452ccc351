"""From raw records (an image as bytes or a path, a caption) to training items, skipping bad input.

Real data sources (``datamodules.hf``, ``datamodules.webdataset``) yield *records*: dicts with an image in some
column (HF's ``{"bytes", "path"}``, raw bytes or a file path) and a caption. ``RecordDecoder`` turns one into an
item ``{"image": (3, H, W) in [-1, 1], "caption": str}`` or raises ``BadSample`` naming the record. Images are
turned upright by their EXIF orientation and converted to RGB by value range (``to_rgb``: 16-bit, float and
transparent images included).

The training datasets here skip a bad record and count it in the next item's ``"skipped"`` field every time they
pass over it (the training step sums that into TensorBoard: ``data/skipped_step`` per step, ``data/skipped_epoch``
per epoch); ``SkipLog`` logs each bad record once per process (logger ``lit_dimba.data``) with a running count.
A validation set instead leaves bad records out up front (``usable_records``), so that no item counts twice.
"""

import io
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from datamodules.buckets import resize_and_crop
from lit_dimba.errors import ConfigError

log = logging.getLogger("lit_dimba.data")
EmptyCaption = Literal["drop", "unconditional"]
# Transparent pixels are composited onto this colour (white, as image viewers show them).
BACKGROUND = (255, 255, 255)
# The EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
SIDEWAYS = (5, 6, 7, 8)
# What messages call a streamed record that has neither an image path nor a key.
UNNAMED = "a record without a path or key"


class BadSample(Exception):
    """A record that cannot be used: ``where`` names it (file path or ``shard:key``; None for a record with
    neither, e.g. a row of image bytes, which the dataset then names by its row), ``reason`` says why."""

    def __init__(self, where: str | None, reason: str):
        super().__init__(f"{where or UNNAMED}: {reason}")
        self.where = where
        self.reason = reason


def _gray_by_range(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float gray image as 8-bit "L" (or "LA" with its transparency key), by range.

    Integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I``...) span [0, 65535]: Pillow opens 16-bit gray PNG/TIFF as
    ``I;16`` and 16-bit PGM as ``I``, and 32-bit TIFFs of wider range are rare; values outside are clipped. A float
    image (``F``) spans [0, 1] if no value exceeds 1, else [0, 255] if none exceeds 255, else [0, 65535] if none
    exceeds 65535, else [0, its maximum]; NaN and infinities count as 0, negative values as 0.
    """
    values = np.asarray(image)  # (H, W) uint16 / int32 / float32
    scaled = values.astype(np.float32)
    if image.mode == "F":
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(scaled.max(initial=0.0))
        top = next((t for t in (1.0, 255.0, 65535.0) if peak <= t), peak)
    else:
        top = 65535.0
    gray = Image.fromarray(np.round(np.clip(scaled, 0, top) * (255 / top)).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int):
        gray.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L"))
    return gray


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow opens, as 8-bit "RGB", converted by value range rather than by clipping.

    - ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion (CMYK
      naively, without its ICC profile; LAB through the CIE L*a*b* to sRGB formula).
    - 16-bit and 32-bit integer gray (``I;16``, ``I;16B``, ``I``...): [0, 65535] to [0, 255]; float gray (``F``):
      [0, 1], [0, 255] or [0, 65535], the first that holds every value, else [0, max] (see ``_gray_by_range``).
    - Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a palette or gray/RGB image with a transparency
      key, 16-bit gray with one): composited onto ``BACKGROUND`` (white), so transparent pixels become white.

    Returns a new image of the same size; the input is not changed.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _gray_by_range(image)
    elif image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if not image.has_transparency_data:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as it is displayed: with width and height swapped when its EXIF
    orientation turns it sideways. Reads the header only (``Image.Image.getexif``; PNG's own ``getexif`` would
    decode the pixels to look for an eXIf chunk after them: such a rare late chunk is missed here, and its image,
    decoded upright, is cropped to the bucket of its stored shape)."""
    width, height = image.size
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return (width, height) if orientation in SIDEWAYS else (height, width)


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

    def name(self, record: dict) -> str | None:
        """The record's name in messages: its image path, else its webdataset ``shard:key``, else None."""
        for column in self.image_columns:
            value = record.get(column)
            if isinstance(value, dict) and value.get("path"):
                return str(value["path"])
            if isinstance(value, str):
                return value
        if "__key__" in record:
            return f"{record['__url__']}:{record['__key__']}" if record.get("__url__") else str(record["__key__"])
        return None

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

    def size(self, record: dict) -> tuple[int, int]:
        """The record's image (height, width) as displayed (EXIF orientation applied), from its header only;
        ``BadSample`` if it is absent or unreadable."""
        return upright_size(self.open(record))

    def image(self, record: dict) -> Image.Image:
        """The record's image decoded, turned upright by its EXIF orientation and converted to RGB (``to_rgb``);
        ``BadSample`` if it is missing or corrupt."""
        image = self.open(record)
        try:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
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


class SkipLog:
    """Logs each bad record once, with a running count; a dataset's items count it every time it is skipped.

    Each process (each data-loader worker) has its own copy, so a record may be logged once per worker. ``key``
    identifies a record: its row for a map-style dataset, its name in a stream (where every record without a
    path or key shares the name None, so only the first of those is logged; all are counted).
    """

    def __init__(self):
        self.logged: set[Hashable] = set()
        self.skips = 0

    def __call__(self, where: str, reason: str, key: Hashable) -> None:
        self.skips += 1
        if key in self.logged:
            return
        self.logged.add(key)
        log.warning("skipped %s (%s); bad records so far: %d, skipped %d times in all (each is logged once)",
                    where, reason, len(self.logged), self.skips)


def usable_records(records: Sequence[dict], decode: RecordDecoder, what: str) -> list[int]:
    """Indices of the ``records`` whose caption and image decode, for a validation set that leaves bad records out
    instead of repeating a neighbour in their place. Decodes every image once; reports the left-out records
    in one log line (how many, the first few with their reasons)."""
    usable, bad = [], []
    for i, record in enumerate(records):
        try:
            decode.caption(record)
            decode.image(record)
            usable.append(i)
        except BadSample as error:
            bad.append(f"{error.where or f'row {i}'} ({error.reason})")
    if bad:
        log.warning("%s: left out %d unusable record(s) of %d: %s%s", what, len(bad), len(usable) + len(bad),
                    "; ".join(bad[:5]), "; ..." if len(bad) > 5 else "")
    return usable


class RecordDataset(Dataset):
    """Map-style items from indexable ``records``; a bad record is replaced by the next usable one.

    ``size_of(i)`` gives item i's (height, width) (one size, or its aspect bucket); a replacement must have the
    same size. After ``max_skip`` bad records in a row it stops with an error: the data is broken, not noisy.
    A replacement repeats an item, which a training epoch can afford; give a validation set only
    ``usable_records``.
    """

    def __init__(self, records: Sequence[dict], decode: RecordDecoder, size_of: Callable[[int], tuple[int, int]],
                 max_skip: int = 64):
        self.records = records
        self.decode = decode
        self.size_of = size_of
        self.max_skip = max_skip
        self.skip_log = SkipLog()

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
                    self.skip_log(bad.where or f"row {j}", bad.reason, key=j)
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
        self.skip_log = SkipLog()

    def __iter__(self) -> Iterator[dict]:
        skipped = 0
        passes = 0
        while True:
            for record in self.records:
                try:
                    yield {**self.decode(record, self.size), "skipped": skipped}
                    skipped = 0
                except BadSample as bad:
                    self.skip_log(bad.where or UNNAMED, bad.reason, key=bad.where)
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
