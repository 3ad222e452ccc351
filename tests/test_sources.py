"""Real-data sources on small files made on the fly: image folders, Parquet (+ streaming), webdataset shards,
bad input, a training step from each, and mid-epoch resume."""

import io
import json
import os
import tarfile

import datasets
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import CaptionImageDataModule, HFDatasetSource, ImageFolderSource, SyntheticShapesSource, WebDatasetSource
from datamodules.buckets import bucket_sizes, nearest_bucket
from lit_dimba.errors import ConfigError
from main import main
from tests.conftest import DEMO, TINY, launch

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30), (200, 30, 200), (30, 200, 200)]


def png(i: int, size=(24, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(buffer, fmt)
    return buffer.getvalue()


def image_folder(root, n=6, captions=None, bad=(), missing=(), metadata="jsonl", column="caption", sizes=None):
    """n images with captions; indices in ``bad`` are corrupt files, in ``missing`` are listed but absent;
    ``sizes(i)`` gives image i's (width, height)."""
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{i:03d}.png"
        if i in bad:
            open(os.path.join(root, name), "wb").write(b"this is not a png")
        elif i not in missing:
            open(os.path.join(root, name), "wb").write(png(i, sizes(i) if sizes else (24, 16)))
        rows.append({"file_name": name, column: captions[i] if captions else f"a picture number {i}"})
    if metadata == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        with open(os.path.join(root, "metadata.csv"), "w") as f:
            f.write(f"file_name,{column}\n" + "".join(f"{r['file_name']},{r[column]}\n" for r in rows))
    return str(root)


def parquet(path, n=6, captions=None):
    table = datasets.Dataset.from_dict({"picture": [{"bytes": png(i), "path": None} for i in range(n)],
                                        "prompt": captions or [f"parquet picture {i}" for i in range(n)]})
    table.cast_column("picture", datasets.Image()).to_parquet(str(path))
    return str(path)


def shards(folder, n_shards=2, per_shard=3, json_caption=False):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}i{i}"
                ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
                caption = json.dumps({"caption": f"shard {s} item {i}"}) if json_caption else f"shard {s} item {i}"
                for name, data in ((f"{key}.{ext}", png(i, fmt=fmt)),
                                   (f"{key}.{'json' if json_caption else 'txt'}", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def items(dataset, n):
    it = iter(dataset) if isinstance(dataset, torch.utils.data.IterableDataset) else (dataset[i] for i in range(n))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_image_folder_items(tmp_path, metadata):
    source = ImageFolderSource(image_folder(tmp_path / "data", metadata=metadata), caption_column="caption")
    got = items(source.train_dataset(16), 6)
    assert all(item["image"].shape == (3, 16, 16) and -1 <= item["image"].min() <= item["image"].max() <= 1
               for item in got)
    assert sorted(item["caption"] for item in got) == [f"a picture number {i}" for i in range(6)]
    assert all(item["skipped"] == 0 for item in got)


def test_bad_images_are_skipped_counted_and_logged(tmp_path, caplog):
    root = image_folder(tmp_path / "data", n=6, bad=(1,), missing=(2,))
    dataset = ImageFolderSource(root, caption_column="caption").train_dataset(16)
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        item = dataset[1]
    assert item["caption"] == "a picture number 3" and item["skipped"] == 2
    assert "001.png" in caplog.text and "002.png" in caplog.text and "does not exist" in caplog.text
    assert "bad records so far: 2, skipped 2 times" in caplog.text


def test_a_bad_image_is_logged_once_but_counted_every_epoch(tmp_path, caplog):
    root = image_folder(tmp_path / "data", n=6, missing=(2,))
    dataset = ImageFolderSource(root, caption_column="caption").train_dataset(16)
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        skipped = [sum(dataset[i]["skipped"] for i in range(len(dataset))) for _epoch in range(3)]
    assert skipped == [1, 1, 1]
    lines = [r.getMessage() for r in caplog.records if "002.png" in r.getMessage()]
    assert len(lines) == 1 and "does not exist" in lines[0], lines


@pytest.mark.parametrize("policy", ["drop", "unconditional"])
def test_empty_captions(tmp_path, policy, caplog):
    captions = ["one", "", "three", "  ", None, "six"]
    root = image_folder(tmp_path / "data", captions=captions)
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        dataset = ImageFolderSource(root, caption_column="caption", empty_caption=policy).train_dataset(16)
    got = sorted(item["caption"] for item in items(dataset, len(dataset)))
    assert got == (["one", "six", "three"] if policy == "drop" else ["", "", "", "one", "six", "three"])
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    if policy == "unconditional":
        assert lines == []
        return
    assert len(lines) == 1, lines  # how many and which, in one line
    assert "dropped 3 of 6 records with an empty or missing caption (column 'caption')" in lines[0]
    assert all(os.path.join(root, f"{i:03d}.png") in lines[0] for i in (1, 3, 4))
    assert "empty_caption: unconditional" in lines[0]


def test_empty_captions_in_a_stream_are_skipped_counted_and_logged(tmp_path, caplog):
    captions = ["one", "", "three", "  ", "five", "six"]
    source = HFDatasetSource("parquet", data_files=parquet(tmp_path / "p.parquet", captions=captions),
                             image_column="picture", caption_column="prompt", streaming=True, shuffle_buffer=1)
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        got = items(source.train_dataset(16), 4)
    assert [item["caption"] for item in got] == ["one", "three", "five", "six"]
    assert [item["skipped"] for item in got] == [0, 1, 1, 0]
    assert caplog.text.count("empty or missing caption") == 1  # rows of bytes have no name: the first is logged


def test_webdataset_samples_without_a_caption_are_skipped_counted_and_named(tmp_path, caplog):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for key, caption in (("a", b"first"), ("b", b"  "), ("c", None), ("d", b"last")):
            for name, data in ((f"{key}.png", png(0)), (f"{key}.txt", caption)):
                if data is not None:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = WebDatasetSource(str(path), val_shards=str(path))
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        got = list(source.val_dataset(16))
    assert [(item["caption"], item["skipped"]) for item in got] == [("first", 0), ("last", 2)]
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    assert len(lines) == 2 and all("empty or missing caption" in line for line in lines)
    assert lines[0].startswith(f"skipped {path}:b (") and lines[1].startswith(f"skipped {path}:c (")


def test_validation_leaves_bad_records_out_instead_of_repeating_one(tmp_path, caplog):
    root = image_folder(tmp_path / "data", n=8, bad=(5,), missing=(7,))
    source = ImageFolderSource(root, caption_column="caption", num_val=4)
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        val = source.val_dataset(16)
    captions = [val[i]["caption"] for i in range(len(val))]
    assert captions == ["a picture number 4", "a picture number 6"]  # no neighbour stands in for 5 or 7
    assert all(val[i]["skipped"] == 0 for i in range(len(val)))
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    assert len(lines) == 1 and "left out 2 unusable record(s) of 4" in lines[0]
    assert "005.png (cannot read the image" in lines[0] and "007.png (image file does not exist)" in lines[0]
    broken = image_folder(tmp_path / "broken", n=4, bad=(2, 3))
    with pytest.raises(ConfigError, match="no usable samples"):
        ImageFolderSource(broken, caption_column="caption", num_val=2).val_dataset(16)


def test_clear_errors(tmp_path):
    root = image_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"no column 'text'.*columns are \['image', 'caption'\]"):
        ImageFolderSource(root).train_dataset(16)
    with pytest.raises(ConfigError, match="not a folder"):
        ImageFolderSource(str(tmp_path / "nowhere"))
    empty = image_folder(tmp_path / "empty", n=3, captions=["", " ", ""])
    with pytest.raises(ConfigError, match="no usable samples"):
        ImageFolderSource(empty, caption_column="caption").train_dataset(16)
    broken = image_folder(tmp_path / "broken", n=3, bad=(0, 1, 2))
    datamodule = CaptionImageDataModule(ImageFolderSource(broken, caption_column="caption"), resolution=16)
    with pytest.raises(ConfigError, match="no usable samples at its start"):
        datamodule.train_dataloader()
    with pytest.raises(ConfigError, match="do not exist"):
        WebDatasetSource(str(tmp_path / "shards" / "*.tar"))


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_and_streaming(tmp_path, streaming):
    source = HFDatasetSource("parquet", data_files=parquet(tmp_path / "train.parquet"), image_column="picture",
                             caption_column="prompt", streaming=streaming, num_val=2, shuffle_buffer=4)
    train = items(source.train_dataset(16), 4)
    assert {item["caption"] for item in train} <= {f"parquet picture {i}" for i in range(6)}
    assert all(item["image"].shape == (3, 16, 16) for item in train)
    val = [item["caption"] for item in items(source.val_dataset(16), 2)]
    assert len(val) == 2 and not set(val) & ({i["caption"] for i in train} if not streaming else set())
    assert [p["caption"] for p in source.test_prompts()] == val


@pytest.mark.parametrize("json_caption", [False, True])
def test_webdataset_shards(tmp_path, json_caption):
    paths = shards(tmp_path / "shards", json_caption=json_caption)
    source = WebDatasetSource(str(tmp_path / "shards" / "shard-{000..001}.tar"), val_shards=paths[1],
                              caption_extension="json" if json_caption else "txt", shuffle_buffer=0)
    got = items(source.train_dataset(16), 8)  # 6 samples, repeated: a stream has no end
    assert {item["caption"] for item in got} == {f"shard {s} item {i}" for s in range(2) for i in range(3)}
    assert all(item["image"].shape == (3, 16, 16) for item in got)
    assert [p["caption"] for p in source.test_prompts()] == [f"shard 1 item {i}" for i in range(3)]


def source_yaml(tmp_path, source: dict) -> str:
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(source))
    return str(path)


def test_training_step_from_each_source(in_tmp):
    """One fit of 2 steps through the CLI per source, with a bad image counted in TensorBoard."""
    folder = image_folder(in_tmp / "folder", n=8, bad=(3,))
    sources = {
        "folder": {"class_path": "datamodules.ImageFolderSource",
                   "init_args": {"root": folder, "caption_column": "caption", "num_val": 2}},
        "parquet": {"class_path": "datamodules.HFDatasetSource",
                    "init_args": {"path": "parquet", "data_files": parquet(in_tmp / "p.parquet"),
                                  "image_column": "picture", "caption_column": "prompt", "num_val": 2}},
        "stream": {"class_path": "datamodules.HFDatasetSource",
                   "init_args": {"path": "parquet", "data_files": str(in_tmp / "p.parquet"), "streaming": True,
                                 "image_column": "picture", "caption_column": "prompt", "num_val": 2}},
        "shards": {"class_path": "datamodules.WebDatasetSource",
                   "init_args": {"shards": shards(in_tmp / "shards"), "val_shards": str(in_tmp / "shards/shard-001.tar")}},
    }
    for name, source in sources.items():
        main(["fit", "--config", DEMO, "--config", TINY, "--data.init_args.source", source_yaml(in_tmp, source),
              "--data.init_args.batch_size", "4", "--trainer.max_steps", "2", "--trainer.logger.init_args.name", name,
              "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
        scalars = EventAccumulator(f"logs/{name}/version_0").Reload().Tags()["scalars"]
        assert "train/loss" in scalars and "val/loss" in scalars, name
    folder_events = EventAccumulator("logs/folder/version_0").Reload()
    assert sum(e.value for e in folder_events.Scalars("data/skipped_step")) >= 1, "the corrupt image is counted"


class RecordCaptions(__import__("lightning").pytorch.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "captions": batch["caption"]}) + "\n")


@pytest.mark.parametrize("source", ["synthetic", "folder", "buckets"])
def test_resume_mid_epoch_continues_with_the_next_batch(in_tmp, source):
    extra = []
    if source in ("folder", "buckets"):
        folder = image_folder(in_tmp / "folder", n=12, sizes=lambda i: SHAPES[i % 3])
        extra = ["--data.init_args.source", source_yaml(in_tmp, {
            "class_path": "datamodules.ImageFolderSource",
            "init_args": {"root": folder, "caption_column": "caption", "num_val": 0}})]
    if source == "buckets":
        extra += ["--data.init_args.buckets", "true", "--data.init_args.bucket_multiple", "4"]
    common = ["--config", DEMO, "--config", TINY, *extra, "--data.init_args.batch_size", "2",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks",
              json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "ckpt", "save_top_k": -1, "every_n_train_steps": 1}},
                          {"class_path": "tests.test_sources.RecordCaptions", "init_args": {"path": "full.jsonl"}}])]
    main(["fit", *common, "--trainer.max_steps", "5"])  # 12 images / batch 2: 6 batches per epoch
    full = [json.loads(line) for line in open("full.jsonl")]
    resumed = [arg.replace("full.jsonl", "resumed.jsonl") for arg in common]
    main(["fit", *resumed, "--trainer.max_steps", "5", "--ckpt_path", "ckpt/epoch=0-step=3.ckpt"])
    again = [json.loads(line) for line in open("resumed.jsonl")]
    assert [r["step"] for r in again] == [3, 4]
    assert [r["captions"] for r in again] == [r["captions"] for r in full[3:5]]
    assert full[3]["captions"] != full[0]["captions"]


SHAPES = [(48, 24), (24, 48), (32, 32)]  # landscape, portrait, square (width, height)


def test_aspect_buckets_batch_one_shape_each(tmp_path):
    root = image_folder(tmp_path / "data", n=18, sizes=lambda i: SHAPES[i % 3])
    datamodule = CaptionImageDataModule(ImageFolderSource(root, caption_column="caption"), resolution=16,
                                        batch_size=3, buckets=True, bucket_multiple=4)
    table = bucket_sizes(16, 4, 2.0)
    expected = {table[nearest_bucket(h, w, table)] for w, h in SHAPES}
    assert len(expected) == 3, "the three shapes fall into three buckets"
    seen = set()
    for batch in datamodule.train_dataloader():
        shape = tuple(batch["image"].shape[-2:])
        seen.add(shape)
        numbers = [int(c.split()[-1]) for c in batch["caption"]]
        assert len({SHAPES[n % 3] for n in numbers}) == 1, "a batch holds one bucket"
        assert shape == table[nearest_bucket(SHAPES[numbers[0] % 3][1], SHAPES[numbers[0] % 3][0], table)]
    assert seen == expected


def test_exif_orientation_sets_the_bucket(tmp_path):
    """A portrait photo stored as landscape pixels plus an EXIF orientation: a portrait bucket, upright pixels."""
    root = tmp_path / "data"
    root.mkdir()
    image = Image.new("RGB", (48, 24), COLOURS[0])
    image.paste(COLOURS[2], (24, 0, 48, 24))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    image.save(root / "photo.jpg", exif=exif.tobytes(), quality=95)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "photo.jpg", "caption": "a flag"}) + "\n")
    table = bucket_sizes(16, 4, 2.0)
    dataset = ImageFolderSource(str(root), caption_column="caption").train_dataset(16, buckets=table)
    assert dataset.image_sizes == [(48, 24)]
    height, width = table[dataset.bucket_of[0]]
    assert height > width
    pixels = dataset[0]["image"]
    assert pixels.shape == (3, height, width)
    top, bottom = pixels[:, : height // 2].mean((1, 2)), pixels[:, height // 2:].mean((1, 2))
    assert top[0] > 0.5 > top[2] and bottom[2] > 0.5 > bottom[0]  # red on top, blue below


def test_buckets_need_a_source_that_knows_image_sizes(tmp_path):
    with pytest.raises(ConfigError, match="square images only"):
        CaptionImageDataModule(SyntheticShapesSource(), resolution=16, buckets=True, bucket_multiple=8).train_dataloader()


def test_training_steps_on_buckets_through_the_cli(in_tmp):
    root = image_folder(in_tmp / "data", n=18, sizes=lambda i: SHAPES[i % 3])
    source = source_yaml(in_tmp, {"class_path": "datamodules.ImageFolderSource",
                                  "init_args": {"root": root, "caption_column": "caption", "num_val": 0}})
    args = ["fit", "--config", DEMO, "--config", TINY, "--data.init_args.source", source, "--data.init_args.buckets",
            "true", "--data.init_args.bucket_multiple", "4", "--data.init_args.batch_size", "3",
            "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false"]
    main(args)
    assert "train/loss" in EventAccumulator("logs/tiny/version_0").Reload().Tags()["scalars"]
    with pytest.raises(SystemExit, match="data.bucket_multiple=2 is not divisible by 4"):
        main(args + ["--data.init_args.bucket_multiple", "2"])


@pytest.mark.slow
def test_ddp_with_buckets_finishes_every_epoch_on_both_ranks(in_tmp):
    """Two CPU processes (gloo) through Lightning's DDP, 2 epochs on uneven buckets: no rank waits at the end."""
    root = image_folder(in_tmp / "data", n=16, sizes=lambda i: SHAPES[i % 3])  # buckets of 6, 5 and 5 images
    source = source_yaml(in_tmp, {"class_path": "datamodules.ImageFolderSource",
                                  "init_args": {"root": root, "caption_column": "caption", "num_val": 0}})
    launch(in_tmp, "fit", "--config", DEMO, "--config", TINY, "--data.init_args.source", source,
           "--data.init_args.buckets", "true", "--data.init_args.bucket_multiple", "4", "--data.init_args.batch_size",
           "2", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "2", "--trainer.max_steps", "-1",
           "--trainer.strategy", "ddp", "--trainer.use_distributed_sampler", "false",
           "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", timeout=240)
    assert sorted(p.name for p in in_tmp.glob("finished-*")) == ["finished-0", "finished-1"]
    steps = EventAccumulator("logs/tiny/version_0").Reload().Scalars("train/loss")
    # 3 + 2 + 2 = 7 full batches per epoch: an odd count, cut to 6 so that each rank runs 3 per epoch
    assert steps[-1].step == 5
