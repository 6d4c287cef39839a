"""Every PIL mode decodes to the uint8 values it means, in every decoding path: the in-memory
loader (``_decode``), ``load_image`` (cnnkit predict) and the streamed reader
(``read_resized_crop``); and a decompression bomb is a ValueError naming the file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.classification import _decode, load_data, load_image
from cnnkit.data.streaming import read_resized_crop

NAN = float("nan")


def _image(mode: str, values) -> Image.Image:
    """A 1 x N (or 1 x N x bands) image of ``mode`` holding ``values`` exactly."""
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        array = np.array([values], dtype=dtype)
        return Image.frombytes(
            mode, (array.shape[1], 1), array.astype(array.dtype.newbyteorder("<")).tobytes()
        )
    if mode == "P":
        im = Image.new("P", (len(values), 1))
        im.putpalette([0, 0, 0, 90, 90, 90, 200, 100, 50] + [0] * (3 * 253))
        im.putdata(values)
        return im
    im = Image.new(mode, (len(values), 1))
    im.putdata(values)
    return im


# (mode, file suffix, pixel values, expected "L" values, expected "RGB" values), by hand:
# 16-bit: round(v * 255 / 65535); I: the same, clipped to 0..65535; F: [0, 1] scaled by 255
# when the maximum is <= 1, else 0..255 clipped (NaN: 0); alpha dropped; P through its
# palette; CMYK: R = 255 - (C * (255 - K) / 255 + K) etc. (PIL's conversion); "1": 0 / 255.
CASES = [
    ("I;16", ".png", [0, 257, 1000, 32768, 65535], [0, 1, 4, 128, 255], None),
    ("I", ".tif", [-5, 300, 65535, 70000, 12850], [0, 1, 255, 255, 50], None),
    ("F", ".tif", [0.0, 0.2, 0.5004, 1.0, NAN], [0, 51, 128, 255, 0], None),
    ("F", ".tif", [-3.0, 0.4, 100.6, 300.0, NAN], [0, 0, 101, 255, 0], None),
    (
        "RGBA",
        ".png",
        [(10, 10, 10, 0), (200, 200, 200, 255), (10, 20, 30, 7), (0, 0, 0, 0), (5, 5, 5, 9)],
        [10, 200, None, 0, 5],
        [(10, 10, 10), (200, 200, 200), (10, 20, 30), (0, 0, 0), (5, 5, 5)],
    ),
    ("LA", ".png", [(77, 0), (0, 255), (255, 3), (1, 1), (128, 0)], [77, 0, 255, 1, 128], None),
    (
        "P",
        ".png",
        [0, 1, 2, 1, 0],
        [0, 90, None, 90, 0],
        [(0,) * 3, (90,) * 3, (200, 100, 50), (90,) * 3, (0,) * 3],
    ),
    (
        "CMYK",
        ".tif",
        [(0, 0, 0, 0), (0, 0, 0, 255), (100, 0, 0, 50), (255, 0, 0, 0), (0, 0, 0, 55)],
        [255, 0, None, None, 200],
        [(255,) * 3, (0,) * 3, (125, 205, 205), (0, 255, 255), (200,) * 3],
    ),
    ("1", ".png", [0, 255, 255, 0, 255], [0, 255, 255, 0, 255], None),
]


def _decoded_paths(path, channels, width):
    """The three decoding paths at the file's own size (no resampling): ``uint8 [C, 1, W]``
    from the in-memory loader and load_image, and the streamed reader on the whole image."""
    yield "memory", _decode(path, channels, (1, width))
    as_float = load_image(path, (channels, 1, width))
    yield "load_image", (as_float * 255).round().to(torch.uint8)


@pytest.mark.parametrize(("mode", "suffix", "values", "gray", "rgb"), CASES)
def test_every_mode_decodes_to_its_meaning(tmp_path, mode, suffix, values, gray, rgb):
    path = tmp_path / f"image{suffix}"
    _image(mode, values).save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really holds this mode
    width = len(values)
    if rgb is None:
        rgb = [(v,) * 3 for v in gray]
    for channels, expected in ((1, gray), (3, rgb)):
        for where, got in _decoded_paths(path, channels, width):
            got = got.reshape(channels, width)
            for x, value in enumerate(expected):
                if value is None:  # a colour's gray level: PIL's weighted sum, not ours
                    continue
                want = torch.tensor(value if channels == 3 else [value], dtype=torch.uint8)
                assert torch.equal(got[:, x], want), (where, channels, x, got)


@pytest.mark.parametrize(("mode", "suffix", "values", "gray", "rgb"), CASES)
def test_streamed_reader_decodes_every_mode(tmp_path, mode, suffix, values, gray, rgb):
    # The streamed reader serves squares: a 5 x 5 image of the values repeated in each row,
    # cropped whole and served at 5 x 5 (no resampling).
    path = tmp_path / f"square{suffix}"
    row = _image(mode, values)
    square = Image.new(row.mode, (5, 5))
    if mode == "P":
        square.putpalette(row.getpalette())
    for y in range(5):
        square.paste(row, (0, y))
    square.save(path)
    if rgb is None:
        rgb = [(v,) * 3 for v in gray]
    for channels, expected in ((1, gray), (3, rgb)):
        got = read_resized_crop(str(path), channels, 5, lambda w, h: (0, 0, w, h), False)
        assert got.shape == (channels, 5, 5) and got.dtype == torch.uint8
        for x, value in enumerate(expected):
            if value is None:
                continue
            want = torch.tensor(value if channels == 3 else [value], dtype=torch.uint8)
            assert torch.equal(got[:, 2, x], want), (channels, x, got[:, 2])


def test_sixteen_bit_folder_classes_keep_their_shades(tmp_path):
    # The reported failure: a 16-bit grayscale class came out all white (clipped to 255).
    for i in range(10):
        for name, level in (("dark", 10000), ("light", 50000)):
            path = tmp_path / "imgs" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6), level, dtype=np.uint16)).save(path)
    d = load_data(f"folder:{tmp_path / 'imgs'}", image_size=6)
    assert d.input_size == (1, 6, 6)
    for label, level in ((0, 10000), (1, 50000)):
        shades = d.train.images[d.train.labels == label].unique().tolist()
        assert shades == [round(level * 255 / 65535)]


def _png_header(path, width, height):
    """A PNG holding only its header: PIL reads the size from it when the file is opened."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_names_the_file_in_memory(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        for i in range(5):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), 9).save(root / name / f"{i}.png")
    _png_header(root / "b" / "huge.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"cannot read image .*huge\.png: .*decompression bomb"):
        load_data(f"folder:{root}", image_size=8)
    with pytest.raises(ValueError, match=r"huge\.png"):
        load_image(root / "b" / "huge.png", (1, 8, 8))
