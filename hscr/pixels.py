"""Full-range grayscale pixels kept beside a stored PNG, so the viewer can re-window it.

The store keeps one 8-bit PNG per image. For DICOM and 16-bit sources the importers and the app
also write ``<image id>.window.npz`` next to it: the pixel values after the modality LUT (Hounsfield units
for CT), the default window, the VOI LUT function and the polarity. No DICOM tag other than
these display settings is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hscr.images import LoadedImage


def window_file(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + ".window.npz")


def save_window_pixels(image_path: Path, loaded: LoadedImage) -> Path | None:
    """Write the re-windowable pixels of ``loaded`` beside ``image_path``; None for colour images."""
    if loaded.pixels is None:
        return None
    target = window_file(image_path)
    if target.exists():
        return target
    tmp = target.with_name(target.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        pixels=loaded.pixels,
        window=np.array([loaded.window_center if loaded.window_center is not None else np.nan,
                         loaded.window_width if loaded.window_width is not None else np.nan]),
        voi_function=np.array(loaded.voi_function),
        invert=np.array(bool(loaded.invert)),
    )
    tmp.replace(target)
    return target


def load_window_pixels(image_path: Path, source_format: str = "dicom") -> LoadedImage | None:
    """Read the pixels saved by :func:`save_window_pixels`; None when the image has none."""
    path = window_file(image_path)
    if not path.is_file():
        return None
    from PIL import Image

    with np.load(path, allow_pickle=False) as data:
        pixels = data["pixels"]
        center, width = (float(v) for v in data["window"])
        voi_function = str(data["voi_function"])
        invert = bool(data["invert"])
    with Image.open(image_path) as stored:
        image = stored.convert("L")
    return LoadedImage(
        image=image,
        source_format=source_format,
        pixels=pixels,
        window_center=None if np.isnan(center) else center,
        window_width=None if np.isnan(width) else width,
        voi_function=voi_function,
        invert=invert,
    )
