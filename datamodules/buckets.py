"""Aspect-ratio buckets: train on images of many shapes at roughly constant pixel area.

Instead of squashing or square-cropping every image, each image is assigned to the *bucket* whose aspect ratio is
closest to its own, resized to cover that bucket's size and centre-cropped to it; batches are then drawn from one
bucket at a time, so every batch stacks into a single (B, 3, H, W) tensor.

- ``bucket_sizes`` computes the table of (height, width) sizes for a base resolution and a size multiple (the VAE
  downsampling factor times the patch size, so every bucket maps to a whole number of tokens);
- ``nearest_bucket`` picks the bucket of an image from its original size;
- ``resize_and_crop`` turns a PIL image into the model's (3, H, W) tensor in [-1, 1] at a bucket's size;
- ``BucketBatchSampler`` yields single-bucket batches of dataset indices, shuffled per epoch, split evenly across
  distributed ranks (every rank yields the same number of batches, so DDP never waits on a missing gradient sync),
  and resumable mid-epoch through ``state_dict`` / ``load_state_dict``.
"""

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Sampler
from torchvision.transforms import InterpolationMode

# A bucket may exceed the base area by at most this fraction (it is never further below it than one size step).
MAX_AREA_OVERSHOOT = 0.05


def bucket_sizes(base_resolution: int, multiple: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The (height, width) bucket table for images of about ``base_resolution**2`` pixels.

    The long side steps over the multiples of ``multiple`` from ``base_resolution`` upwards; for each, the short side
    is the multiple of ``multiple`` whose area is closest to ``base_resolution**2`` among those at most
    ``MAX_AREA_OVERSHOOT`` above it and with long / short <= ``max_ratio``. Each (short, long) pair is used both as a
    landscape and a portrait bucket, so the table is symmetric under transposition and contains the square
    (base_resolution, base_resolution). When that square is the only bucket (e.g. ``multiple`` equal to
    ``base_resolution``, or half of it with ``max_ratio`` < 3) it warns, naming the numbers: every image would be
    cropped square.

    Example:
        >>> bucket_sizes(256, 64)
        [(128, 512), (128, 448), (128, 384), (192, 320), (256, 256), (320, 192), (384, 128), (448, 128), (512, 128)]

    Args:
        base_resolution: side of the square bucket; must be a positive multiple of ``multiple``.
        multiple: every height and width is a multiple of this (e.g. VAE factor 8 x patch size 2 = 16).
        max_ratio: largest long / short side ratio; aspect ratios h / w span [1 / max_ratio, max_ratio].

    Returns:
        Distinct (height, width) pairs sorted by aspect ratio h / w, widest first.
    """
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if (not isinstance(base_resolution, int) or isinstance(base_resolution, bool) or base_resolution <= 0
            or base_resolution % multiple):
        raise ValueError(f"base_resolution must be a positive multiple of multiple={multiple}, got {base_resolution!r}")
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio!r}")
    area = base_resolution**2
    max_area = area * (1 + MAX_AREA_OVERSHOOT)
    sizes = set()
    long_side = base_resolution
    # Beyond this, long / short > max_ratio for every short side within the area limit.
    while long_side**2 <= max_ratio * max_area:
        below = area // long_side // multiple * multiple
        fits = [short for short in (below, below + multiple)
                if short > 0 and short * long_side <= max_area and long_side <= max_ratio * short]
        if fits:
            short = min(fits, key=lambda s: (abs(s * long_side - area), s))
            sizes.update({(short, long_side), (long_side, short)})
        long_side += multiple
    if len(sizes) == 1 and max_ratio > 1:  # max_ratio 1 asks for the square alone
        warnings.warn(f"the bucket table for resolution {base_resolution}, multiple {multiple} and max_ratio "
                      f"{max_ratio} holds only the square ({base_resolution}, {base_resolution}): in steps of "
                      f"{multiple}, no other shape with long/short <= {max_ratio} has an area near "
                      f"{base_resolution}^2 (at most {MAX_AREA_OVERSHOOT:.0%} above it), so every image is cropped "
                      "square; lower the multiple (data.bucket_multiple) well below half the resolution, or raise "
                      "max_ratio (data.bucket_max_ratio)", stacklevel=2)
    return sorted(sizes, key=lambda hw: (hw[0] / hw[1], hw[0]))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose log aspect ratio log(h / w) is closest to that of a height x width image.

    Ties go to the first such bucket.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height!r}, width={width!r}")
    if not buckets:
        raise ValueError("buckets is empty")
    target = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Scale ``image`` to cover ``size`` with the least scaling, then centre-crop it to ``size``.

    Resampling is bicubic with antialiasing (torchvision); the crop removes the overhang, which lies along one axis
    (up to a pixel of rounding on the other).

    Args:
        image: any PIL image; converted with ``convert("RGB")``, which clips 16-bit values and drops transparency
            (``datamodules.records.to_rgb`` converts those by range first).
        size: target (height, width).

    Returns:
        Tensor [3, height, width], float32 in [-1, 1].
    """
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be a positive (height, width), got {size!r}")
    pixels = TF.pil_to_tensor(image.convert("RGB"))  # [3, h, w] uint8
    h, w = pixels.shape[-2:]
    scale = max(height / h, width / w)
    covering = [max(height, round(h * scale)), max(width, round(w * scale))]
    pixels = TF.resize(pixels, covering, interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = TF.center_crop(pixels, [height, width])
    return TF.to_dtype(pixels, torch.float32, scale=True) * 2 - 1


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each drawn from a single bucket, split evenly across distributed ranks.

    Every epoch, with a ``torch.Generator`` seeded by ``seed + epoch``: the items of each bucket are shuffled and cut
    into batches of ``batch_size``; the list of all batches is shuffled, cut to a multiple of ``num_replicas``, and
    rank r takes batches r, r + num_replicas, ... So all ranks yield exactly ``len(self)`` batches (a rank with an
    extra batch would hang in DDP's gradient all-reduce) and the order is a pure function of ``bucket_of``, ``seed``
    and the epoch: every rank must be given the same ``bucket_of``.

    With ``drop_last=True`` (the default) each bucket's last, incomplete batch is dropped, so no item repeats within an
    epoch and every batch holds ``batch_size`` items. With ``drop_last=False`` incomplete batches are kept, and the
    batch list is padded to a multiple of ``num_replicas`` by repeating batches from its start.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call ``set_epoch(epoch)`` before each epoch; under
    Lightning, which calls ``set_epoch`` on ``loader.batch_sampler.sampler`` (hence the ``sampler`` property), pass
    ``Trainer(use_distributed_sampler=False)`` so that Lightning does not try to wrap it in a ``DistributedSampler``.

    Resuming: ``state_dict()`` is {"epoch", "batches_yielded"} (batches this rank has taken from the current epoch);
    after ``load_state_dict(state)`` the next iteration continues with the following batch of that epoch (a state
    saved after an epoch's last batch continues with the next epoch). torchdata's ``StatefulDataLoader`` calls both
    itself: it saves the sampler state as each batch is handed to its workers and, on resume, loads it and iterates
    afresh. The plain ``torch.utils.data.DataLoader`` calls neither; call them yourself (e.g. from a checkpoint
    callback), noting that with ``num_workers > 0`` the sampler runs ahead of the training loop by the prefetched
    batches, which a resume would then skip.

    Args:
        bucket_of: bucket index of every dataset item (e.g. from ``nearest_bucket``), [N] ints.
        batch_size: items per batch (per rank).
        num_replicas: number of ranks; defaults to the world size of the initialised process group, else 1.
        rank: this rank; defaults to the rank in the initialised process group, else 0.
        seed: base seed of the shuffles, shared by all ranks.
        drop_last: drop each bucket's incomplete last batch (see above).
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
    ):
        super().__init__()
        if isinstance(bucket_of, Sampler):
            raise TypeError(
                f"bucket_of must be a sequence of bucket indices, got a {type(bucket_of).__name__}; under Lightning "
                "pass Trainer(use_distributed_sampler=False) so that it does not replace this sampler's argument"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._batches_yielded = 0
        self._resume_from = 0

        labels = torch.as_tensor(bucket_of, dtype=torch.long).reshape(-1)
        order = torch.argsort(labels, stable=True)
        _, counts = torch.unique_consecutive(labels[order], return_counts=True)
        self._members = order.split(counts.tolist())  # item indices of each bucket, in bucket order
        if drop_last:
            total = sum(len(members) // batch_size for members in self._members)
            if total == 0:
                raise ValueError(f"no bucket holds batch_size={batch_size} items; lower the batch size or add images")
            if total < num_replicas:
                raise ValueError(f"only {total} full batches of batch_size={batch_size} for num_replicas="
                                 f"{num_replicas} ranks; lower the batch size or add images")
            self._length = total // num_replicas
        else:
            if labels.numel() == 0:
                raise ValueError("bucket_of is empty")
            total = sum(math.ceil(len(members) / batch_size) for members in self._members)
            self._length = math.ceil(total / num_replicas)

    @property
    def sampler(self) -> "BucketBatchSampler":
        """This sampler: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` at each epoch start."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on, from its first batch.

        Setting the epoch already set keeps a position restored by ``load_state_dict``.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches_yielded = 0
            self._resume_from = 0

    def _rank_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, ``len(self)`` lists of item indices."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for members in self._members:
            shuffled = members[torch.randperm(len(members), generator=generator)]
            chunks = shuffled.split(self.batch_size)
            batches += [chunk.tolist() for chunk in chunks if len(chunk) == self.batch_size or not self.drop_last]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        total = self._length * self.num_replicas
        batches = [batches[i % len(batches)] for i in range(total)]  # truncates (drop_last) or pads
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch and resume position are read at the first next(), so a set_epoch or load_state_dict
        # called after a DataLoader has created its (not yet started) iterator is still honoured.
        batches = self._rank_batches()
        start, self._resume_from = self._resume_from, 0
        self._batches_yielded = start
        for batch in batches[start:]:
            self._batches_yielded += 1  # counted before handing the batch out, so a saved state never repeats it
            yield batch

    def __len__(self) -> int:
        return self._length

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batches_yielded"}: the position of this rank in the current epoch."""
        return {"epoch": self.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by ``state_dict``; the next iteration continues right after it."""
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        if not 0 <= done <= self._length:
            raise ValueError(f"batches_yielded={done} is outside [0, {self._length}]; the state was saved with a "
                             "different data set, batch size or number of ranks")
        if done == self._length:
            epoch, done = epoch + 1, 0
        self.epoch = epoch
        self._batches_yielded = self._resume_from = done
