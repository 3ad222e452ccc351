"""Caption-image pairs from webdataset tar shards, for data that does not fit one disk.

Each sample of a shard is a group of files sharing a key: an image (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and
a caption (``.txt``, or ``.json`` with the caption under ``caption_key``). Shards are read with the ``webdataset``
library, split over ranks and data-loader workers, and repeated until ``trainer.max_steps``. A sample without a
readable image, or without a caption under ``empty_caption: drop``, is skipped as it is read: logged once (named
``shard:key``) and counted with the other bad records in the next item's ``"skipped"`` (``datamodules.records``).
"""

import glob
import os

import webdataset as wds
from torch.utils.data import Dataset

from datamodules.caption_image import CaptionImageSource, read_prompt_file
from datamodules.records import BadSample, EmptyCaption, RecordDecoder, RecordStream
from lit_dimba.errors import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(shards: str | list[str], field: str) -> list[str]:
    """Shard paths from a list, a glob (``shards/*.tar``) or a brace pattern (``shards/{000..099}.tar``)."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    paths = []
    for pattern in patterns:
        if "{" in pattern:
            paths += list(wds.shardlists.expand_urls(pattern))
        else:
            paths += sorted(glob.glob(pattern)) or [pattern]
    missing = [p for p in paths if "://" not in p and not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"data.source.{field}: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}; "
                          "give tar files, a glob such as shards/*.tar or a brace pattern shards/{000..099}.tar")
    return paths


class WebDatasetSource(CaptionImageSource):
    """Caption-image pairs streamed from webdataset tar shards.

    Args:
        shards: training shards (list, glob or brace pattern); ``val_shards`` for validation.
        caption_extension: ``txt`` or ``json``; ``caption_key`` is the field of a ``.json`` caption.
        empty_caption: ``drop`` samples without a caption, or train them as ``unconditional``.
        shuffle_buffer: samples shuffled in memory (shards are shuffled too); 0 keeps the order.
        test_prompts: a text file of prompts for ``test``; by default the first ``num_test_prompts`` captions of
            the validation shards.
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        caption_extension: str = "txt",
        caption_key: str = "caption",
        empty_caption: EmptyCaption = "drop",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        test_prompts: str | None = None,
        num_test_prompts: int = 16,
    ):
        self.shards = expand_shards(shards, "shards")
        self.val_shards = expand_shards(val_shards, "val_shards") if val_shards else None
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.test_prompt_file = test_prompts
        self.num_test_prompts = num_test_prompts
        self.decode = RecordDecoder(IMAGE_EXTENSIONS, caption_extension, caption_key, empty_caption)

    def _records(self, shards: list[str], train: bool) -> wds.WebDataset:
        records = wds.WebDataset(shards, handler=wds.warn_and_continue, shardshuffle=len(shards) if train else False,
                                 detshuffle=True, seed=self.seed, nodesplitter=wds.split_by_node if train else None,
                                 empty_check=False)
        if train and self.shuffle_buffer:
            records = records.shuffle(self.shuffle_buffer)
        return records

    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> Dataset:
        if buckets:
            raise ConfigError("aspect-ratio buckets need the sizes of all images up front, which webdataset shards "
                              "do not give; set data.buckets: false")
        return RecordStream(self._records(self.shards, True), self.decode, (resolution, resolution), repeat=True)

    def val_dataset(self, resolution: int) -> Dataset:
        if not self.val_shards:
            raise ConfigError("validation needs data.source.val_shards (or set trainer.limit_val_batches: 0)")
        return RecordStream(self._records(self.val_shards, False), self.decode, (resolution, resolution), repeat=False)

    def test_prompts(self) -> list[dict]:
        if self.test_prompt_file:
            return [{"caption": p} for p in read_prompt_file(self.test_prompt_file)]
        captions = []
        for record in self._records(self.val_shards or self.shards, False):
            if len(captions) == self.num_test_prompts:
                break
            try:
                text = self.decode.caption(record)
            except BadSample:
                continue
            if text:
                captions.append({"caption": text})
        return captions
