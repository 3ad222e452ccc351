"""From records to items: RGB by value range for every mode, EXIF orientation, logging a bad record once, and a
validation set without bad records."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.records import (RecordDataset, RecordDecoder, RecordStream, to_rgb, upright_size,
                                 usable_records)

WHITE, BLACK, RED, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255)


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """The pixels of a one-row image, left to right."""
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image)[0]]


def row(mode: str, values, dtype=None, **info) -> Image.Image:
    """A one-row image of ``mode`` holding ``values`` (from a numpy array of ``dtype`` if given), with ``info``
    (e.g. ``transparency``)."""
    if dtype:
        image = Image.fromarray(np.array([values], dtype=dtype))  # the mode follows from the dtype
    else:
        image = Image.new(mode, (len(values), 1))
        for x, value in enumerate(values):
            image.putpixel((x, 0), value)
    assert image.mode == mode
    image.info.update(info)
    return image


def gray(*levels: int) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in levels]


# ---------------------------------------------------------------- to_rgb


CONVERSIONS = [
    # 16-bit gray spans [0, 65535]: 257 * k is 8-bit level k; convert("RGB") made everything above 255 white.
    (row("I;16", [0, 257 * 100, 32768, 65535], "<u2"), gray(0, 100, 128, 255)),
    (row("I;16B", [0, 257 * 100, 32768, 65535], ">u2"), gray(0, 100, 128, 255)),
    # 32-bit integer: the 16-bit range too (16-bit PGM opens as "I"); outside it clips.
    (row("I", [-5, 257 * 100, 65535, 70000], "<i4"), gray(0, 100, 255, 255)),
    # Float: [0, 1] when every value is <= 1, else [0, 255], else [0, 65535], else [0, max]; NaN is black.
    (row("F", [0.0, 0.5, 1.0, -0.2, float("nan")], "<f4"), gray(0, 128, 255, 0, 0)),
    (row("F", [0.0, 100.0, 255.0], "<f4"), gray(0, 100, 255)),
    (row("F", [0.0, 257 * 100, 65535], "<f4"), gray(0, 100, 255)),
    (row("F", [0.0, 50000.0, 100000.0], "<f4"), gray(0, 128, 255)),
    # Transparency is composited onto white.
    (row("RGBA", [(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]), [WHITE, BLUE, gray(127)[0]]),
    (row("RGBa", [(0, 0, 0, 0), (0, 0, 255, 255)]), [WHITE, BLUE]),
    (row("LA", [(0, 0), (0, 255), (100, 255)]), [WHITE, BLACK, gray(100)[0]]),
    (row("La", [(0, 0), (50, 255)]), [WHITE, gray(50)[0]]),
    (row("L", [0, 100], transparency=0), [WHITE, gray(100)[0]]),
    (row("RGB", [RED, BLUE], transparency=RED), [WHITE, BLUE]),
    (row("I;16", [0, 257 * 100], "<u2", transparency=0), [WHITE, gray(100)[0]]),
    # Plain modes: Pillow's conversion.
    (row("1", [0, 1]), [BLACK, WHITE]),
    (row("L", [0, 100, 255]), gray(0, 100, 255)),
    (row("RGB", [RED, BLUE]), [RED, BLUE]),
    (row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), [WHITE, (0, 255, 255), BLACK]),
    (row("HSV", [(0, 255, 255), (0, 0, 0)]), [RED, BLACK]),
    (row("YCbCr", [(255, 128, 128), (0, 0, 0)]), [WHITE, (0, 135, 0)]),
    (row("LAB", [(255, 128, 128), (0, 128, 128), (136, 208, 195)]), [(254, 255, 254), (1, 0, 1), (250, 3, 11)]),
]


@pytest.mark.parametrize("image, expected", CONVERSIONS,
                         ids=[image.mode + (" with a key" if image.info else "") for image, _ in CONVERSIONS])
def test_to_rgb_converts_by_value_range(image, expected):
    out = to_rgb(image)
    assert out.size == image.size
    assert pixels(out) == expected


def test_to_rgb_palette_with_transparency():
    palette = row("P", [0, 1, 2])
    palette.putpalette([*RED, *BLUE, 0, 255, 0])
    palette.info["transparency"] = 0  # one transparent index (PNG tRNS, GIF)
    assert pixels(to_rgb(palette)) == [WHITE, BLUE, (0, 255, 0)]
    with_alpha = row("PA", [(0, 0), (1, 255), (0, 128)])
    with_alpha.putpalette([*RED, *BLUE])
    transparent, opaque, (r, g, b) = pixels(to_rgb(with_alpha))
    assert transparent == WHITE and opaque == BLUE
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half-transparent red on white


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_16_bit_png_is_decoded_by_range():
    """The reported bug: a mid-gray 16-bit PNG came out white."""
    data = encoded(Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    item = RecordDecoder(["image"], "text")({"image": data, "text": "gray"}, (8, 8))
    assert torch.allclose(item["image"], torch.full((3, 8, 8), 100 / 255 * 2 - 1))


# ---------------------------------------------------------------- EXIF orientation


def sideways_jpeg(orientation: int) -> bytes:
    """Landscape pixels (32 wide, 16 high: left half red, right half blue) tagged with an EXIF orientation."""
    image = Image.new("RGB", (32, 16), RED)
    image.paste(BLUE, (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def colour(pixels: torch.Tensor) -> tuple[int, int, int]:
    """The mean colour of (3, H, W) pixels in [-1, 1], each channel rounded to 0 or 255."""
    return tuple(255 if v > 0 else 0 for v in pixels.mean((1, 2)).tolist())


@pytest.mark.parametrize("orientation, size, first, second", [
    (1, (16, 32), RED, BLUE),  # as stored: red left, blue right
    (6, (32, 16), RED, BLUE),  # shown turned 90 degrees clockwise: red on top, blue below
    (8, (32, 16), BLUE, RED),  # turned 90 degrees counter-clockwise: blue on top, red below
])
def test_exif_orientation_is_applied(orientation, size, first, second):
    decode = RecordDecoder(["jpg"], "txt")
    record = {"jpg": sideways_jpeg(orientation), "txt": "a flag"}
    assert decode.size(record) == size  # (height, width) from the header: what aspect buckets use
    assert upright_size(Image.open(io.BytesIO(record["jpg"]))) == size
    image = decode(record, size)["image"]  # (3, H, W) in [-1, 1]
    halves = (image[:, :, :16], image[:, :, 16:]) if orientation == 1 else (image[:, :16], image[:, 16:])
    assert [colour(half) for half in halves] == [first, second]


# ---------------------------------------------------------------- bad records


def records_with_bad(n: int, bad: set[int]) -> list[dict]:
    good = encoded(Image.new("RGB", (8, 8), RED), "PNG")
    return [{"image": b"not an image" if i in bad else good, "text": f"record {i}"} for i in range(n)]


def test_a_bad_record_is_logged_once_and_counted_every_time(caplog):
    dataset = RecordDataset(records_with_bad(4, {1}), RecordDecoder(["image"], "text"), lambda i: (8, 8))
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        got = [dataset[1] for _epoch in range(3)]
    assert [(item["caption"], item["skipped"]) for item in got] == [("record 2", 1)] * 3
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("skipped row 1 (cannot read the image")  # a row of bytes is named by its row
    assert "bad records so far: 1, skipped 1 times in all" in lines[0]


def test_a_stream_logs_each_bad_record_once_with_a_running_count(caplog):
    records = [{**record, "__key__": f"k{i}", "__url__": "shard.tar"}
               for i, record in enumerate(records_with_bad(5, {1, 3}))]
    stream = RecordStream(records, RecordDecoder(["image"], "text"), (8, 8))
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        got = list(itertools.islice(stream, 9))  # three passes over 3 good records
    assert sum(item["skipped"] for item in got) == 6  # 2 per pass, counted every time
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("skipped shard.tar:k1 (") and "bad records so far: 1, skipped 1 times in all" in lines[0]
    assert lines[1].startswith("skipped shard.tar:k3 (") and "bad records so far: 2, skipped 2 times in all" in lines[1]


def test_usable_records_leave_bad_ones_out_in_one_line(caplog):
    records = records_with_bad(5, {0, 3})
    records[2]["text"] = "  "
    with caplog.at_level("WARNING", logger="lit_dimba.data"):
        assert usable_records(records, RecordDecoder(["image"], "text"), "val") == [1, 4]
    lines = [r.getMessage() for r in caplog.records if r.name == "lit_dimba.data"]
    assert len(lines) == 1 and lines[0].startswith("val: left out 3 unusable record(s) of 5: row 0 (cannot read")
    assert "row 2 (empty or missing caption" in lines[0] and "row 3 (" in lines[0]
