"""Raster image loading, windowing and rejection of bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hscr.errors import DataError
from hscr.images import (
    WINDOW_PRESETS,
    LoadedImage,
    apply_window,
    full_range_window,
    load_any,
    load_image_bytes,
    load_image_file,
    open_stored,
    render_window,
)


def _gradient(size: int = 16) -> np.ndarray:
    return np.arange(size * size, dtype=np.uint8).reshape(size, size)


@pytest.mark.parametrize("suffix,fmt", [(".png", "png"), (".jpg", "jpeg"), (".tif", "tiff"), (".bmp", "bmp")])
def test_raster_formats_load_rgb(tmp_path: Path, suffix: str, fmt: str):
    pixels = np.stack([_gradient()] * 3, axis=-1)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path)
    loaded = load_any(path)
    assert loaded.source_format == fmt
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (16, 16)
    assert loaded.pixels is None
    if fmt != "jpeg":
        assert np.array_equal(np.asarray(loaded.image), pixels)


def test_grayscale_keeps_values(tmp_path: Path):
    path = tmp_path / "gray.png"
    Image.fromarray(_gradient()).save(path)
    loaded = load_image_file(path)
    assert loaded.image.mode == "L"
    assert np.array_equal(np.asarray(loaded.image), _gradient())
    assert loaded.pixels is not None
    assert loaded.pixels.max() == 255


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_scaled_to_full_range(tmp_path: Path, suffix: str):
    values = np.array([[1000, 1500], [2000, 3000]], dtype=np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    loaded = load_any(path)
    assert loaded.image.mode == "L"
    rendered = np.asarray(loaded.image)
    assert rendered[0, 0] == 0
    assert rendered[1, 1] == 255
    # 1500 lies at (1500 - 1000) / 2000 of the range: 63.75 rounds to 64.
    assert rendered[0, 1] == 64
    assert np.array_equal(loaded.pixels, values.astype(np.float32))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    loaded = load_image_file(path)
    assert loaded.image.mode == "RGB"
    red, green, blue = loaded.image.getpixel((4, 4))
    assert red > 200
    assert green < 60
    assert blue < 60


def test_not_an_image_rejected(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(DataError, match="not a readable image"):
        load_any(path)


def test_truncated_jpeg_rejected(tmp_path: Path):
    full = tmp_path / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:600])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_any(cut)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb_rejected(tmp_path: Path):
    # A valid PNG header declaring 40,000 x 40,000 pixels (1.6 billion) with almost no data.
    header = struct.pack(">IIBBBBB", 40_000, 40_000, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(DataError, match="decompression bomb"):
        load_any(path)


def test_missing_file_named(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_any(tmp_path / "absent.png")


def test_frame_on_raster_rejected(tmp_path: Path):
    path = tmp_path / "gray.png"
    Image.fromarray(_gradient()).save(path)
    with pytest.raises(DataError, match="no frame 2"):
        load_any(path, frame=2)


def test_png_bytes_drop_metadata(tmp_path: Path):
    path = tmp_path / "tagged.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Patient")
    Image.fromarray(_gradient()).save(path, pnginfo=info)
    stored = load_image_file(path).png_bytes()
    assert b"Jane Patient" not in stored
    out = tmp_path / "stored.png"
    out.write_bytes(stored)
    with Image.open(out) as reopened:
        assert "Author" not in reopened.info
    assert open_stored(out).mode == "RGB"


def test_image_bytes_loader(tmp_path: Path):
    path = tmp_path / "gray.png"
    Image.fromarray(_gradient()).save(path)
    loaded = load_image_bytes(path.read_bytes(), "cell 3")
    assert np.array_equal(np.asarray(loaded.image), _gradient())
    with pytest.raises(DataError, match="cell 3"):
        load_image_bytes(b"garbage", "cell 3")


class TestWindow:
    def test_linear_formula_values(self):
        # Window 40/400: values <= -160 are black, values > 239 white, 100 maps to
        # ((100 - 39.5) / 399 + 0.5) * 255 = 166.17.
        values = np.array([[-1000.0, -160.0, 100.0, 239.0, 240.0]])
        assert apply_window(values, 40, 400).tolist() == [[0, 0, 166, 255, 255]]

    def test_linear_exact_values(self):
        values = np.array([[-160.0, 40.0, 140.0, 241.0]])
        # (140 - 40) / 400 + 0.5 = 0.75 -> 191.25
        assert apply_window(values, 40, 400, "LINEAR_EXACT").tolist() == [[0, 128, 191, 255]]

    def test_sigmoid_center_is_mid_gray(self):
        assert apply_window(np.array([[40.0]]), 40, 400, "SIGMOID").tolist() == [[128]]

    def test_invalid_width_rejected(self):
        with pytest.raises(DataError, match="width"):
            apply_window(np.zeros((2, 2)), 0, 0.5)

    def test_full_range_window_maps_ends(self):
        values = np.array([[-50.0, 0.0, 150.0]])
        center, width = full_range_window(values)
        assert apply_window(values, center, width).tolist() == [[0, 64, 255]]

    def test_presets_are_ct_windows(self):
        assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
        assert WINDOW_PRESETS["soft_tissue"] == (40.0, 400.0)
        assert WINDOW_PRESETS["bone"][0] > WINDOW_PRESETS["soft_tissue"][0]
        assert WINDOW_PRESETS["brain"][1] < WINDOW_PRESETS["soft_tissue"][1]

    def test_render_window_and_invert(self):
        values = np.array([[-1000.0, 100.0, 1000.0]], dtype=np.float32)
        loaded = LoadedImage(image=Image.new("L", (3, 1)), source_format="dicom", pixels=values)
        assert np.asarray(render_window(loaded, 40, 400)).tolist() == [[0, 166, 255]]
        assert np.asarray(render_window(loaded, 40, 400, invert=True)).tolist() == [[255, 89, 0]]

    def test_render_window_monochrome1_default_inverted(self):
        values = np.array([[-1000.0, 1000.0]], dtype=np.float32)
        loaded = LoadedImage(image=Image.new("L", (2, 1)), source_format="dicom", pixels=values, invert=True)
        assert np.asarray(render_window(loaded, 40, 400)).tolist() == [[255, 0]]
        assert np.asarray(render_window(loaded, 40, 400, invert=True)).tolist() == [[0, 255]]

    def test_colour_has_no_window(self, tmp_path: Path):
        path = tmp_path / "rgb.png"
        Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
        with pytest.raises(DataError, match="colour"):
            render_window(load_any(path), 40, 400)
