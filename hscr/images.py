"""Image loading for import and display: raster files, DICOM, windowing.

Every image is decoded, checked and rendered to an 8-bit PNG before it is stored, so the rest of
the project reads one format. Grayscale sources (DICOM, 16-bit PNG/TIFF) also keep their
full-range pixel values and default window, so a viewer can re-window them::

    loaded = load_any("CT_small.dcm")
    lung = render_window(loaded, *WINDOW_PRESETS["lung"])
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from hscr.errors import DataError

# Larger images are rejected as possible decompression bombs (about 16k x 16k pixels).
MAX_PIXELS = 268_000_000

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}

# Common CT display windows in Hounsfield units, as (center, width).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


@dataclass
class LoadedImage:
    """A decoded image ready to store, with non-identifying metadata.

    ``pixels`` contains the grayscale values a window applies to, shape (H, W). For DICOM these
    are values after the modality LUT, so Hounsfield units for CT. It is None for colour images.
    """

    image: Image.Image                     # RGB or L, 8-bit, rendered with the default window
    source_format: str
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"           # DICOM VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID
    invert: bool = False                   # MONOCHROME1: low values display bright
    frame: int = 0
    num_frames: int = 1

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        # A fresh image drops any metadata (EXIF, ICC, text chunks) the source carried.
        clean = Image.frombytes(self.image.mode, self.image.size, self.image.tobytes())
        clean.save(buffer, format="PNG")
        return buffer.getvalue()


# -- windowing ------------------------------------------------------------------------------------


def apply_window(
    pixels: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map values to 0..255 with a DICOM window (PS3.3 C.11.2.1.2); return uint8.

    ``LINEAR`` is the standard's default formula with its half-pixel offsets, ``LINEAR_EXACT``
    maps [center - width/2, center + width/2] exactly, ``SIGMOID`` is the logistic curve.
    """
    x = np.asarray(pixels, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DataError(f"invalid window width {width}: SIGMOID needs a width above 0")
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise DataError(f"invalid window width {width}: LINEAR_EXACT needs a width above 0")
        low, high = center - width / 2.0, center + width / 2.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, ((x - center) / width + 0.5) * 255.0))
    elif function == "LINEAR":
        if width < 1:
            raise DataError(f"invalid window width {width}: a LINEAR window needs a width of at least 1")
        low = center - 0.5 - (width - 1) / 2.0
        high = center - 0.5 + (width - 1) / 2.0
        ramp = ((x - (center - 0.5)) / max(width - 1, 1e-12) + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, ramp))
    else:
        raise DataError(f"unknown VOI LUT function {function!r}; supported: LINEAR, LINEAR_EXACT, SIGMOID")
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def full_range_window(pixels: np.ndarray) -> tuple[float, float]:
    """Return the LINEAR (center, width) that maps the minimum to 0 and the maximum to 255."""
    low, high = float(np.min(pixels)), float(np.max(pixels))
    return (low + high) / 2.0 + 0.5, high - low + 1.0


def render_window(loaded: LoadedImage, center: float, width: float, invert: bool = False) -> Image.Image:
    """Render a grayscale image with another window; ``invert`` flips the default polarity.

    MONOCHROME1 DICOMs are already shown inverted by default, so ``invert=True`` shows them
    with high values bright. Inversion is applied after windowing.
    """
    if loaded.pixels is None:
        raise DataError(
            f"this {loaded.source_format} image is in colour and has no window; "
            "windowing applies to grayscale images (DICOM, 16-bit PNG or TIFF) only"
        )
    function = loaded.voi_function if loaded.voi_function in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR"
    out = apply_window(loaded.pixels, float(center), float(width), function)
    if loaded.invert != bool(invert):
        out = 255 - out
    return Image.fromarray(out)


# -- loading --------------------------------------------------------------------------------------


def is_dicom(path: str | Path) -> bool:
    """Return True for a DICOM file: the ``DICM`` marker at byte 128, or a DICOM file suffix."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def load_any(path: str | Path, frame: int = 0) -> LoadedImage:
    """Load a DICOM (the given frame) or a raster image file, rejecting anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if is_dicom(path):
        from hscr.dicom import load_dicom

        return load_dicom(path, frame=frame)
    if frame:
        raise DataError(f"{path} is not a DICOM file, so it has no frame {frame}; use frame 0")
    return load_image_file(path)


def load_image_bytes(data: bytes, name: str, frame: int = 0) -> LoadedImage:
    """Load an image held in memory (Parquet cell, zip member); ``name`` is used in messages."""
    if data[128:132] == b"DICM":
        from hscr.dicom import load_dicom

        return load_dicom(io.BytesIO(data), frame=frame, name=name)
    return _load_raster(io.BytesIO(data), name)


def load_image_file(path: str | Path) -> LoadedImage:
    """Decode a PNG/JPEG/TIFF/BMP file into an 8-bit RGB or grayscale image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    with open(path, "rb") as handle:
        return _load_raster(handle, str(path))


def _load_raster(handle: BinaryIO, name: str) -> LoadedImage:
    try:
        # MAX_PIXELS is checked below, so Pillow's lower warning threshold is silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(handle)
        with opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise DataError(_too_large(name, width * height))
            fmt = (opened.format or Path(name).suffix.lstrip(".") or "unknown").lower()
            opened.load()
            image, pixels = _to_8bit(opened)
    except Image.DecompressionBombError:
        raise DataError(_too_large(name, None)) from None
    except UnidentifiedImageError:
        raise DataError(f"{name} is not a readable image (PNG, JPEG, TIFF, BMP or DICOM expected)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"image {name} is truncated or corrupt ({exc}); export it again from the source") from None
    loaded = LoadedImage(image=image, source_format=fmt, meta={"rows": image.height, "columns": image.width})
    if pixels is not None:
        loaded.pixels = pixels
        loaded.window_center, loaded.window_width = full_range_window(pixels)
    return loaded


def _too_large(name: str, pixels: int | None) -> str:
    size = f"{pixels:,} pixels" if pixels else "too many pixels"
    return f"image {name} has {size}, over the limit of {MAX_PIXELS:,} (possible decompression bomb); downscale it before import"


def _to_8bit(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Return the 8-bit image and, for grayscale sources, the full-range pixel values."""
    if image.mode == "L":
        return image.copy(), np.asarray(image, dtype=np.float32)
    if image.mode == "RGB":
        return image.copy(), None
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image).astype(np.float32)  # (H, W)
        center, width = full_range_window(pixels)
        return Image.fromarray(apply_window(pixels, center, width)), pixels
    if image.mode == "1":
        converted = image.convert("L")
        return converted, np.asarray(converted, dtype=np.float32)
    if image.mode == "LA":
        converted = image.convert("L")
        return converted, np.asarray(converted, dtype=np.float32)
    # CMYK (Pillow undoes the Adobe inversion while decoding), P, RGBA, YCbCr, LAB, HSV.
    return image.convert("RGB"), None


def open_stored(path: str | Path) -> Image.Image:
    """Open an image from the content-addressed store as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")
