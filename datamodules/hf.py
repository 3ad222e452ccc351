"""Caption-image pairs through Hugging Face ``datasets``: a local image folder, local Parquet/Arrow/CSV files, or
any dataset on the hub, in memory-mapped or streaming mode.

An image folder is HF's ``imagefolder`` form: images plus a ``metadata.jsonl`` or ``metadata.csv`` whose
``file_name`` column names each image and whose caption column (``caption_column``) holds its text.

Bad input (see ``datamodules.records``): with ``empty_caption: drop`` a loaded (not streamed) split drops its rows
without a caption up front and says how many and which in one log line; a stream skips them as it reads them and
counts them with the bad images. A loaded validation split leaves out its unusable records up front (one log line)
instead of repeating a neighbour in their place.
"""

import logging
import os
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from datamodules.buckets import nearest_bucket
from datamodules.caption_image import CaptionImageSource, read_prompt_file
from datamodules.records import (BadSample, EmptyCaption, RecordDataset, RecordDecoder, RecordStream, check_columns,
                                 usable_records)
from lit_dimba.errors import ConfigError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("lit_dimba.data")
# ``datasets`` (with pyarrow and pandas: about half a second) is imported where a source first loads its records, not
# with this module, which every run of main.py imports.


class HFDatasetSource(CaptionImageSource):
    """Caption-image pairs loaded with ``datasets.load_dataset``.

    Args:
        path: ``"imagefolder"`` (with ``data_dir``), a file format (``"parquet"``, ``"arrow"``, ``"csv"``, with
            ``data_files``), a hub id (``"org/name"``) or a local dataset folder.
        data_dir, data_files, name: passed to ``load_dataset``.
        split: the training split; ``val_split`` the validation split. Without one, the last ``num_val``
            training rows are held out for validation (the first ``num_val`` when streaming).
        image_column: the image column (or candidates, first present wins); decoded here, so a corrupt or
            missing image is skipped and logged instead of stopping training.
        caption_column: the caption column.
        empty_caption: ``drop`` records without a caption, or train them as ``unconditional`` samples.
        streaming: iterate the dataset without downloading/converting it first (no length; training is bounded
            by ``trainer.max_steps``; shuffled with a buffer of ``shuffle_buffer`` records).
        test_prompts: a text file of prompts (one per line) for ``test``; by default the first
            ``num_test_prompts`` validation captions.
        score_column, min_score: train on a curated subset only: the rows whose ``score_column`` (e.g. an
            aesthetic score) is at least ``min_score`` (validation is filtered the same way).
    """

    def __init__(
        self,
        path: str,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        num_val: int = 0,
        image_column: str | list[str] = "image",
        caption_column: str = "text",
        empty_caption: EmptyCaption = "drop",
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        test_prompts: str | None = None,
        num_test_prompts: int = 16,
        score_column: str | None = None,
        min_score: float | None = None,
    ):
        if (score_column is None) != (min_score is None):
            raise ConfigError("data.source.score_column and min_score go together: set both or neither")
        self.score_column = score_column
        self.min_score = min_score
        if path == "imagefolder" and (data_dir is None or not os.path.isdir(data_dir)):
            raise ConfigError(f"data.source.data_dir={data_dir!r} is not a folder; point it at the folder holding "
                              "the images and their metadata.jsonl / metadata.csv")
        self.load_kwargs = dict(path=path, name=name, data_dir=data_dir, data_files=data_files, streaming=streaming)
        self.where = data_dir or (data_files if isinstance(data_files, str) else None) or path
        self.split = split
        self.val_split = val_split
        self.num_val = num_val
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.test_prompt_file = test_prompts
        self.num_test_prompts = num_test_prompts
        image_columns = [image_column] if isinstance(image_column, str) else list(image_column)
        root = data_dir if path == "imagefolder" else None
        self.decode = RecordDecoder(image_columns, caption_column, empty_caption=empty_caption, root=root)

    def _load(self, split: str):
        """The split with its image column(s) left undecoded; a clear error for a missing split or column."""
        import datasets

        try:
            records = datasets.load_dataset(**self.load_kwargs, split=split)
        except ValueError as error:
            if "split" in str(error).lower():
                raise ConfigError(f"{self.where!r} has no split {split!r} (data.source.split / val_split): "
                                  f"{error}") from error
            raise
        columns = records.column_names or list(records.features or {})
        wanted = {"image_column": self.decode.image_columns, "caption_column": [self.decode.caption_column]}
        if self.score_column:
            wanted["score_column"] = [self.score_column]
        check_columns(columns, wanted, repr(self.where))
        for column in self.decode.image_columns:
            if column in columns and isinstance(records.features.get(column), datasets.Image):
                records = records.cast_column(column, datasets.Image(decode=False))
        if self.decode.empty_caption == "drop" and not self.streaming:  # a stream skips them when it reads them
            records = self._drop_empty_captions(records, split)
        if self.score_column:
            column, least = self.score_column, self.min_score
            records = records.filter(lambda r: r[column] is not None and r[column] >= least)
        return records

    def _drop_empty_captions(self, records: "datasets.Dataset", split: str) -> "datasets.Dataset":
        """The rows whose caption is a non-blank string; the others are reported in one log line (how many, the
        first few by image path, else by row number in the split)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = records.with_format("arrow")[self.decode.caption_column]  # pa.ChunkedArray, one pass in Arrow
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True).to_numpy(zero_copy_only=False)
        else:
            blank = np.ones(len(records), dtype=bool)
        dropped = np.flatnonzero(blank)
        if len(dropped) == 0:
            return records
        first = [self.decode.name(records[int(i)]) or f"row {i}" for i in dropped[:5]]
        log.warning("%r split %r: dropped %d of %d records with an empty or missing caption (column %r): %s%s; set "
                    "data.source.empty_caption: unconditional to train them as unconditional samples", self.where,
                    split, len(dropped), len(records), self.decode.caption_column, ", ".join(first),
                    ", ..." if len(dropped) > len(first) else "")
        return records.select(np.flatnonzero(~blank))

    def _check_not_empty(self, records, split: str) -> None:
        if not self.streaming and len(records) == 0:
            raise ConfigError(f"{self.where!r} split {split!r} has no usable samples (every caption is empty, every "
                              "image is unreadable, or the split is empty); check the caption and image columns "
                              "(the warnings above name the records left out) or set empty_caption: unconditional")

    @cached_property
    def _splits(self):
        """(train records, val records or None), loaded once for training, validation and test prompts."""
        train = self._load(self.split)
        if self.val_split:
            return train, self._load(self.val_split)
        if not self.num_val:
            return train, None
        if self.streaming:
            return train.skip(self.num_val), train.take(self.num_val)
        n = len(train)
        if self.num_val >= n:
            raise ConfigError(f"data.source.num_val={self.num_val} leaves no training rows of {n}; lower num_val")
        return train.select(range(n - self.num_val)), train.select(range(n - self.num_val, n))

    def image_sizes(self, records) -> list[tuple[int, int]]:
        """Each record's (height, width), from ``width``/``height`` columns when the data has them (taken as the
        upright size), else from the image header as displayed: a JPEG whose EXIF orientation turns it sideways
        gets its width and height swapped, as decoding will turn its pixels (read once, pixels not decoded; an
        unreadable image counts as square and is skipped when loaded)."""
        if {"width", "height"} <= set(records.column_names):
            return list(zip(records["height"], records["width"]))
        sizes = []
        for record in records:
            try:
                sizes.append(self.decode.size(record))
            except BadSample:
                sizes.append((1, 1))
        return sizes

    def _dataset(self, records, resolution: int, train: bool, rank: int, world_size: int,
                 buckets: list[tuple[int, int]] | None = None) -> Dataset:
        size = (resolution, resolution)
        if buckets:
            if self.streaming:
                raise ConfigError("aspect-ratio buckets need the sizes of all images up front; set "
                                  "data.source.streaming: false or data.buckets: false")
            sizes = self.image_sizes(records)
            bucket_of = [nearest_bucket(h, w, buckets) for h, w in sizes]
            dataset = RecordDataset(records, self.decode, lambda i: buckets[bucket_of[i]])
            dataset.bucket_of = bucket_of
            dataset.image_sizes = sizes
            return dataset
        if self.streaming:
            if train:
                from datasets.distributed import split_dataset_by_node

                records = records.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
                records = split_dataset_by_node(records, rank=rank, world_size=world_size)
            return RecordStream(records, self.decode, size, repeat=train)
        return RecordDataset(records, self.decode, lambda i: size)

    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> Dataset:
        train, _ = self._splits
        self._check_not_empty(train, self.split)
        return self._dataset(train, resolution, True, rank, world_size, buckets)

    def val_dataset(self, resolution: int) -> Dataset:
        """The validation records, without the unusable ones: a loaded split is checked once here (every image
        decoded) so that no item stands in for a bad one and counts twice in ``val/loss``; a stream skips them."""
        _, val = self._splits
        if val is None:
            raise ConfigError("validation needs data.source.val_split or data.source.num_val > 0 (or set "
                              "trainer.limit_val_batches: 0)")
        split = self.val_split or self.split
        if not self.streaming:
            val = val.select(usable_records(val, self.decode, f"{self.where!r} validation records (split {split!r})"))
        self._check_not_empty(val, split)
        return self._dataset(val, resolution, False, 0, 1)

    def test_prompts(self) -> list[dict]:
        if self.test_prompt_file:
            return [{"caption": p} for p in read_prompt_file(self.test_prompt_file)]
        train, val = self._splits
        records = val if val is not None else train
        captions = []
        for record in records:
            if len(captions) == self.num_test_prompts:
                break
            text = record[self.decode.caption_column]
            if isinstance(text, str) and text.strip():
                captions.append({"caption": text.strip()})
        return captions


class ImageFolderSource(HFDatasetSource):
    """A local folder of images with a ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + a caption column).

    Same options as ``HFDatasetSource``; ``root`` is the folder.
    """

    def __init__(self, root: str, caption_column: str = "text", **kwargs):
        super().__init__("imagefolder", data_dir=root, caption_column=caption_column, **kwargs)

