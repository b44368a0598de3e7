"""Image loading for import and display.

Every image is decoded, checked and converted to an 8-bit PNG before it is stored, so the rest
of the project reads one format.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from hscr.errors import DataError

# Larger images are rejected as possible decompression bombs (about 16k x 16k pixels).
MAX_PIXELS = 268_000_000

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass
class LoadedImage:
    """A decoded image ready to store, with non-identifying metadata."""

    image: Image.Image                     # RGB or L, 8-bit
    source_format: str
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        # A fresh image drops any metadata (EXIF, text chunks) the source carried.
        clean = Image.frombytes(self.image.mode, self.image.size, self.image.tobytes())
        clean.save(buffer, format="PNG")
        return buffer.getvalue()


def load_image_file(path: str | Path) -> LoadedImage:
    """Decode a PNG/JPEG/TIFF/BMP file into an 8-bit RGB or grayscale image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as opened:
            fmt = (opened.format or path.suffix.lstrip(".")).lower()
            opened.load()
            image = _to_8bit(opened)
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is too large (over {MAX_PIXELS:,} pixels); downscale it before import") from None
    except UnidentifiedImageError:
        raise DataError(f"{path} is not a readable image (PNG, JPEG, TIFF, BMP or DICOM expected)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} is truncated or corrupt: {exc}") from None
    return LoadedImage(image=image, source_format=fmt)


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in ("RGB", "L"):
        return image.copy()
    if image.mode == "CMYK" or image.mode in ("P", "RGBA", "LA", "YCbCr"):
        return image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype("uint8"), mode="L")
    return image.convert("RGB")


def open_stored(path: str | Path) -> Image.Image:
    """Open an image from the content-addressed store as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")
