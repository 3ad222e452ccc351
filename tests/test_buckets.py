import itertools
import json
import math
import random
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, SequentialSampler

from datamodules.buckets import MAX_AREA_OVERSHOOT, BucketBatchSampler, bucket_sizes, nearest_bucket, resize_and_crop

# 3 buckets of 37, 5 and 61 items, interleaved: with batch 4 they give 9 + 1 + 15 = 25 full batches.
SKEWED = [0] * 37 + [1] * 5 + [2] * 61
random.Random(0).shuffle(SKEWED)


def epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


# ---------------------------------------------------------------- bucket table


def test_bucket_table_known_values():
    assert bucket_sizes(256, 64) == [(128, 512), (128, 448), (128, 384), (192, 320), (256, 256),
                                     (320, 192), (384, 128), (448, 128), (512, 128)]


@pytest.mark.parametrize("base", [256, 512, 1024])
@pytest.mark.parametrize("multiple", [16, 32, 64])
def test_bucket_table_properties(base, multiple):
    table = bucket_sizes(base, multiple)
    area = base**2
    assert len(set(table)) == len(table)
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in table)
    ratios = [h / w for h, w in table]
    assert ratios == sorted(ratios)
    assert (base, base) in table
    assert all((w, h) in table for h, w in table)
    # Ratios span [1/4, 4] with no big hole in between.
    assert math.isclose(ratios[0], 1 / 4) and math.isclose(ratios[-1], 4)
    gaps = [math.log(b / a) for a, b in itertools.pairwise(ratios)]
    assert max(gaps) < math.log(2)
    # Areas: never more than 5% above the base area, never more than one size step (long side x multiple) below it.
    longest = max(max(hw) for hw in table)
    for h, w in table:
        assert area - longest * multiple <= h * w <= area * (1 + MAX_AREA_OVERSHOOT)
    # Each short side is the best one for its long side (brute force over every multiple).
    for h, w in table:
        short, long = min(h, w), max(h, w)
        allowed = [s for s in range(multiple, long + 1, multiple)
                   if s * long <= area * (1 + MAX_AREA_OVERSHOOT) and long <= 4 * s]
        assert abs(short * long - area) == min(abs(s * long - area) for s in allowed)


def test_bucket_table_max_ratio():
    ratios = [h / w for h, w in bucket_sizes(512, 32, max_ratio=2.0)]
    assert all(0.5 <= r <= 2 for r in ratios) and ratios[0] < 0.6 and ratios[-1] > 1.6


@pytest.mark.parametrize("base, multiple, max_ratio", [(256, 256, 4.0), (256, 128, 2.0), (512, 512, 2.0)])
def test_bucket_table_of_the_square_alone_warns(base, multiple, max_ratio):
    with pytest.warns(UserWarning, match=rf"resolution {base}, multiple {multiple} and max_ratio {max_ratio} holds "
                                         rf"only the square \({base}, {base}\).*data.bucket_multiple"):
        assert bucket_sizes(base, multiple, max_ratio) == [(base, base)]


def test_bucket_table_with_shapes_or_asked_square_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(bucket_sizes(256, 128, 4.0)) == 5 and len(bucket_sizes(256, 64, 2.0)) > 1
        assert bucket_sizes(256, 32, max_ratio=1.0) == [(256, 256)]  # square only, as asked


@pytest.mark.parametrize("base, multiple", [(250, 16), (0, 16), (-64, 16), (256, 0), (256.0, 16)])
def test_bucket_table_rejects_bad_sizes(base, multiple):
    with pytest.raises(ValueError, match="multiple"):
        bucket_sizes(base, multiple)


@pytest.mark.parametrize("height, width, expected", [
    (1000, 1000, (256, 256)),
    (768, 1024, (192, 320)),  # 4:3, log ratio -0.29: closer to 0.6 (-0.51) than to 1 (0)
    (1080, 1920, (192, 320)),
    (1920, 1080, (320, 192)),
    (448, 128, (448, 128)),
    (330, 1000, (128, 384)),
    (300, 1000, (128, 448)),  # on a log scale, 0.3 is nearer 128/448 = 0.29 than 1/3
    (10, 1000, (128, 512)),  # beyond the widest bucket
    (1000, 10, (512, 128)),
])
def test_nearest_bucket(height, width, expected):
    table = bucket_sizes(256, 64)
    assert table[nearest_bucket(height, width, table)] == expected


# ---------------------------------------------------------------- resize and crop


@pytest.mark.parametrize("source", [(300, 100), (100, 300), (50, 40), (640, 480)])  # (width, height), as in PIL
@pytest.mark.parametrize("size", [(64, 128), (128, 64), (96, 96)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_resize_and_crop_shape_and_range(source, size, mode):
    noise = torch.randint(0, 256, (source[1], source[0], 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(noise.to(torch.uint8).numpy(), "RGB").convert(mode)
    out = resize_and_crop(image, size)
    assert out.shape == (3, *size) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.05
    assert (resize_and_crop(Image.new(mode, source, "white"), size) == 1).all()
    assert (resize_and_crop(Image.new(mode, source, "black"), size) == -1).all()


@pytest.mark.parametrize("tall", [False, True])
def test_resize_and_crop_keeps_a_centred_disc_centred(tall):
    image = Image.new("RGB", (400, 100))
    ImageDraw.Draw(image).ellipse((170, 20, 230, 80), fill="white")  # radius 30 around the centre (200, 50)
    if tall:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    out = resize_and_crop(image, (64, 64))
    mass = out[0] + 1  # [64, 64], 0 on the black background
    assert mass.sum() > 0.5 * math.pi * 19**2  # the whole disc (radius 30 * 0.64 ~ 19 px) is inside the crop
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre = ((mass * ys).sum() / mass.sum(), (mass * xs).sum() / mass.sum())
    assert torch.allclose(torch.stack(centre), torch.tensor([31.5, 31.5]), atol=0.5)


@pytest.mark.parametrize("tall", [False, True])
def test_resize_and_crop_scales_just_enough_to_cover(tall):
    # 100 x 200 (h x w) with a red band along the top and a blue band along the bottom, into a 50 x 50 bucket:
    # the least covering scale is 1/2, which keeps the full height, so both bands survive the crop.
    image = Image.new("RGB", (200, 100), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 199, 9), fill="red")
    draw.rectangle((0, 90, 199, 99), fill="blue")
    if tall:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    out = resize_and_crop(image, (50, 50))
    if tall:
        out = out.transpose(1, 2)
    assert torch.allclose(out[:, 1].mean(1), torch.tensor([1.0, -1, -1]), atol=0.05)  # red
    assert torch.allclose(out[:, -2].mean(1), torch.tensor([-1.0, -1, 1]), atol=0.05)  # blue
    assert torch.allclose(out[:, 25], torch.ones(3, 50))  # white middle


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_sampler_batches_are_single_bucket_without_repeats(num_replicas):
    ranks = [BucketBatchSampler(SKEWED, 4, num_replicas, rank, seed=1) for rank in range(num_replicas)]
    for epoch in range(3):
        batches = [batch for sampler in ranks for batch in epoch_batches(sampler, epoch)]
        assert len(batches) == 25 // num_replicas * num_replicas
        assert all(len(batch) == 4 and len({SKEWED[i] for i in batch}) == 1 for batch in batches)
        items = [i for batch in batches for i in batch]
        assert len(set(items)) == len(items)


def test_sampler_order_depends_on_epoch_and_seed_only():
    first = BucketBatchSampler(SKEWED, 4, seed=7)
    again = BucketBatchSampler(SKEWED, 4, seed=7)
    other = BucketBatchSampler(SKEWED, 4, seed=8)
    batches = epoch_batches(first, 0)
    assert batches != epoch_batches(first, 1)
    buckets_in_order = [SKEWED[batch[0]] for batch in batches]
    assert buckets_in_order != sorted(buckets_in_order)  # batches of all buckets are interleaved
    assert any(batch != sorted(batch) for batch in batches)  # items are shuffled within their bucket
    for epoch in (0, 5):
        assert epoch_batches(first, epoch) == epoch_batches(again, epoch)
        assert epoch_batches(first, epoch) != epoch_batches(other, epoch)
    assert epoch_batches(first, 5) == epoch_batches(first, 5)


@pytest.mark.parametrize("counts", [(37, 5, 61), (3, 4), (9, 9, 9), tuple(range(1, 11)), (1000,)])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_lengths_equal_across_ranks(counts, num_replicas, drop_last):
    bucket_of = [b for b, n in enumerate(counts) for _ in range(n)]
    full = sum(n // 4 for n in counts)
    if drop_last and full < num_replicas:
        with pytest.raises(ValueError, match="lower the batch size"):
            BucketBatchSampler(bucket_of, 4, num_replicas, 0, drop_last=drop_last)
        return
    ranks = [BucketBatchSampler(bucket_of, 4, num_replicas, rank, drop_last=drop_last) for rank in range(num_replicas)]
    expected = full // num_replicas if drop_last else math.ceil(sum(math.ceil(n / 4) for n in counts) / num_replicas)
    for epoch in range(2):
        batches = [epoch_batches(sampler, epoch) for sampler in ranks]
        assert [len(b) for b in batches] == [len(s) for s in ranks] == [expected] * num_replicas
        flat = [batch for rank_batches in batches for batch in rank_batches]
        assert all(len({bucket_of[i] for i in batch}) == 1 for batch in flat)
        if not drop_last:  # every item is seen at least once
            assert {i for batch in flat for i in batch} == set(range(len(bucket_of)))


def test_sampler_rejects_what_it_cannot_batch():
    with pytest.raises(ValueError, match=r"no bucket holds batch_size=8 items; lower the batch size or add images"):
        BucketBatchSampler([0] * 7 + [1] * 5, 8)
    with pytest.raises(ValueError, match="num_replicas=4"):
        BucketBatchSampler([0] * 12, 4, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(SKEWED, 4, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        BucketBatchSampler(SequentialSampler(range(8)), 4)


@pytest.mark.parametrize("taken", [0, 1, 5, 11])
def test_sampler_resumes_mid_epoch(taken):
    def make():
        return BucketBatchSampler(SKEWED, 4, num_replicas=2, rank=1, seed=3)

    sampler = make()
    sampler.set_epoch(2)
    iterator = iter(sampler)
    head = list(itertools.islice(iterator, taken))
    state = sampler.state_dict()
    assert state == {"epoch": 2, "batches_yielded": taken}
    rest = list(iterator)
    assert head + rest == epoch_batches(make(), 2) and len(rest) == len(sampler) - taken

    # Load, then iterate (and a set_epoch of the same epoch, as a training loop does, keeps the position).
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == rest
    assert resumed.state_dict() == {"epoch": 2, "batches_yielded": len(resumed)}
    assert epoch_batches(resumed, 3) == epoch_batches(make(), 3)  # later epochs start from their first batch

    # A load_state_dict between iter() and the first next() counts too.
    resumed = make()
    iterator = iter(resumed)
    resumed.load_state_dict(state)
    assert list(iterator) == rest

    # Through a DataLoader.
    resumed = make()
    resumed.load_state_dict(state)
    loader = DataLoader(list(range(len(SKEWED))), batch_sampler=resumed)
    assert [batch.tolist() for batch in loader] == rest

    # Moving to another epoch drops the restored position.
    resumed = make()
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 4) == epoch_batches(make(), 4)


def test_sampler_state_after_the_last_batch_resumes_with_the_next_epoch():
    sampler = BucketBatchSampler(SKEWED, 4, seed=3)
    epoch_batches(sampler, 6)
    resumed = BucketBatchSampler(SKEWED, 4, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.state_dict() == {"epoch": 7, "batches_yielded": 0}
    assert list(resumed) == epoch_batches(sampler, 7)
    with pytest.raises(ValueError, match="batches_yielded"):
        resumed.load_state_dict({"epoch": 0, "batches_yielded": len(resumed) + 1})


def test_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = BucketBatchSampler(SKEWED, 4)
    _set_sampler_epoch(DataLoader(list(range(len(SKEWED))), batch_sampler=sampler), 4)
    assert sampler.epoch == 4


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    """One DDP rank: iterate two epochs with one all_reduce per batch, then write what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        sampler = BucketBatchSampler(SKEWED, 4, seed=5)  # rank and num_replicas come from the process group
        loader = DataLoader(list(range(len(SKEWED))), batch_sampler=sampler)
        epochs = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches = []
            for batch in loader:
                grad = torch.ones(1)
                dist.all_reduce(grad)  # as DDP's gradient sync: waits for the other rank's matching call
                assert grad.item() == 2
                batches.append(batch.tolist())
            epochs.append(batches)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"rank": sampler.rank, "num_replicas": sampler.num_replicas, "epochs": epochs}, f)
    finally:
        dist.destroy_process_group()


def test_sampler_under_ddp(tmp_path):
    # forked, not spawned: the ranks need no fresh interpreter that imports torch and this module again
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["num_replicas"]) for r in results] == [(0, 2), (1, 2)]
    for epoch in range(2):
        batches = [r["epochs"][epoch] for r in results]
        assert len(batches[0]) == len(batches[1]) == 12  # 25 full batches, cut to 24
        items = [i for rank_batches in batches for batch in rank_batches for i in batch]
        assert len(items) == len(set(items)) == 96
        assert all(len({SKEWED[i] for i in batch}) == 1 for rank_batches in batches for batch in rank_batches)
    assert results[0]["epochs"][0] != results[0]["epochs"][1]
