"""DICOM decoding, display pipeline and de-identification.

The display pipeline follows DICOM PS3.3 C.11: stored values, then the modality LUT (rescale
slope/intercept or Modality LUT Sequence), then the VOI LUT Sequence or the window, then the
MONOCHROME1 inversion. Only the fields in :data:`KEPT_FIELDS` leave this module, so patient,
physician and institution tags never reach the database, logs or rendered images.

    python -c "from hscr.dicom import load_dicom; print(load_dicom('CT_small.dcm').meta)"
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from hscr.errors import DataError
from hscr.images import MAX_PIXELS, LoadedImage, apply_window, full_range_window

logger = logging.getLogger(__name__)


# pydicom's log records quote element values (patient names included) and decoder tracebacks,
# so they stop at the "pydicom" logger instead of reaching the application's handlers.
_pydicom_logger = logging.getLogger("pydicom")
_pydicom_logger.addHandler(logging.NullHandler())
_pydicom_logger.propagate = False

# Non-identifying attributes copied into LoadedImage.meta, by DICOM keyword -> meta key.
KEPT_FIELDS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "PixelSpacing": "pixel_spacing",
    "ImagerPixelSpacing": "imager_pixel_spacing",
    "SliceThickness": "slice_thickness",
    "PhotometricInterpretation": "photometric_interpretation",
    "BitsStored": "bits_stored",
    "RescaleSlope": "rescale_slope",
    "RescaleIntercept": "rescale_intercept",
    "RescaleType": "rescale_type",
    "ViewPosition": "view_position",
}

# pip packages that add a decoder, by transfer syntax family.
_DECODER_PACKAGES = {
    "jpeg": "pylibjpeg pylibjpeg-libjpeg",
    "jpeg-ls": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "jpeg2000": "pylibjpeg pylibjpeg-openjpeg",
}


def load_dicom(source: str | Path | BinaryIO, frame: int = 0, name: str | None = None) -> LoadedImage:
    """Decode one frame of a DICOM file and render it with its default window.

    Raises DataError for files that are not DICOM, have no image, are truncated, are too large,
    or use a compressed transfer syntax without an installed decoder (naming the package).
    """
    label = name or str(source)
    # pydicom warns about invalid values while converting them lazily, quoting the value.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dataset(source, label)
        return _load_frame(ds, frame, label)


def _read_dataset(source: str | Path | BinaryIO, label: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    forced = False
    try:
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:
            # A dataset written without the Part 10 header still decodes when its encoding is guessable.
            if hasattr(source, "seek"):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
            forced = True
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"DICOM file {label} is truncated or corrupt ({type(exc).__name__}); export it again") from None
    implicit, little = ds.original_encoding
    if forced and ("PixelData" not in ds or "Rows" not in ds or implicit is None):
        raise DataError(f"{label} is not a DICOM image file (no DICM header and no pixel data); export it again as DICOM Part 10")
    if "TransferSyntaxUID" not in ds.file_meta and implicit is not None:
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


def _load_frame(ds: Any, frame: int, label: str) -> LoadedImage:
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = _uid_name(ds.get("SOPClassUID"))
        raise DataError(f"DICOM file {label} has no image ({sop or 'no pixel data'}); choose an image series")
    rows, columns = _int_field(ds, "Rows", label), _int_field(ds, "Columns", label)
    num_frames = _num_frames(ds, label)
    samples = _int_field(ds, "SamplesPerPixel", label, default=1)
    # One frame is decoded at a time, so the whole series may be larger than one image.
    if rows * columns * max(samples, 1) > MAX_PIXELS or rows * columns * num_frames > 8 * MAX_PIXELS:
        raise DataError(
            f"DICOM file {label} declares {rows}x{columns} pixels x {num_frames} frames, over the limit "
            f"of {MAX_PIXELS:,} pixels (possible decompression bomb)"
        )
    if not 0 <= frame < num_frames:
        raise DataError(f"frame {frame} is out of range for {label}: it has {num_frames} frame(s), 0..{num_frames - 1}")

    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DataError(
            f"DICOM file {label} has BurnedInAnnotation YES, so its pixels may show patient details; "
            "mask or crop the annotation, set BurnedInAnnotation to NO and import again"
        )
    stored = _decode_frame(ds, frame, label)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    meta = _kept_meta(ds)
    meta.update({"rows": rows, "columns": columns, "frames": num_frames, "frame": frame})
    modality = meta.get("modality")

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        loaded = _render_grayscale(ds, stored, frame, photometric == "MONOCHROME1", label)
    else:
        loaded = LoadedImage(image=_render_colour(ds, stored, photometric), source_format="dicom")
    loaded.modality = modality
    loaded.frame = frame
    loaded.num_frames = num_frames
    if loaded.pixels is not None:
        meta["window_center"] = loaded.window_center
        meta["window_width"] = loaded.window_width
        meta["voi_function"] = loaded.voi_function
    loaded.meta = meta
    return loaded


def _decode_frame(ds: Any, frame: int, label: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is not None and transfer_syntax.is_compressed:
        _check_decoder(transfer_syntax, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=frame)
    except (ValueError, EOFError) as exc:
        if "less than expected" in str(exc) or isinstance(exc, EOFError):
            raise DataError(f"DICOM file {label} is truncated: its pixel data is shorter than the header declares") from None
        raise DataError(f"DICOM file {label} has invalid image attributes ({exc}); export it again") from None
    except (RuntimeError, NotImplementedError) as exc:
        if transfer_syntax is not None and transfer_syntax.is_compressed:
            raise DataError(
                f"cannot decode the {transfer_syntax.name} pixel data of {label}: the installed decoder failed "
                f"({_first_line(exc)}); install {_packages_for(transfer_syntax)} with pip and import again"
            ) from None
        raise DataError(f"cannot decode the pixel data of {label}: {_first_line(exc)}") from None
    except AttributeError as exc:
        raise DataError(f"DICOM file {label} is missing an image attribute ({_first_line(exc)})") from None


def _check_decoder(transfer_syntax: Any, label: str) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise DataError(
            f"DICOM file {label} uses the transfer syntax {transfer_syntax.name}, which pydicom cannot decode; "
            "convert it to an uncompressed DICOM (for example with dcmdjpeg) and import again"
        ) from None
    if not decoder.is_available:
        raise DataError(
            f"cannot decode the {transfer_syntax.name} pixel data of {label}: no decoder is installed; "
            f"install {_packages_for(transfer_syntax)} with pip and import again"
        )


def _packages_for(transfer_syntax: Any) -> str:
    name = transfer_syntax.name.lower()
    if "jpeg-ls" in name:
        return _DECODER_PACKAGES["jpeg-ls"]
    if "2000" in name or "htj2k" in name:
        return _DECODER_PACKAGES["jpeg2000"]
    return _DECODER_PACKAGES["jpeg"]


def _render_grayscale(ds: Any, stored: np.ndarray, frame: int, monochrome1: bool, label: str) -> LoadedImage:
    from pydicom.pixels import apply_modality_lut

    frame_ds = _frame_view(ds, frame)
    if stored.ndim != 2:
        raise DataError(f"DICOM file {label} has a grayscale image of shape {stored.shape}; expected rows x columns")
    values = apply_modality_lut(stored, frame_ds).astype(np.float32)  # (H, W), e.g. Hounsfield units

    center, width = _first_number(frame_ds.get("WindowCenter")), _first_number(frame_ds.get("WindowWidth"))
    voi_function = str(frame_ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if voi_function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        voi_function = "LINEAR"
    if center is None or width is None or width <= 0 or (voi_function == "LINEAR" and width < 1):
        center, width = full_range_window(values)
        voi_function = "LINEAR"

    if frame_ds.get("VOILUTSequence"):
        # The VOI LUT replaces the window for the default rendering; the window stays for re-windowing.
        rendered = _apply_voi_lut(values, frame_ds.VOILUTSequence[0], ds, label)
    else:
        rendered = apply_window(values, center, width, voi_function)
    if monochrome1:
        rendered = 255 - rendered
    return LoadedImage(
        image=Image.fromarray(rendered),
        source_format="dicom",
        pixels=values,
        window_center=float(center),
        window_width=float(width),
        voi_function=voi_function,
        invert=monochrome1,
    )


def _apply_voi_lut(values: np.ndarray, item: Any, ds: Any, label: str) -> np.ndarray:
    """Map values through a VOI LUT Sequence item and scale its output bits to 0..255.

    Written out here because pydicom 3.0's ``apply_voi`` indexes with the LUT's own dtype, so an
    8-bit LUT with more than 256 entries wraps its inputs.
    """
    try:
        entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        element = item["LUTData"]
        if isinstance(element.value, (bytes, bytearray)):
            little = ds.original_encoding[1] is not False
            lut = np.frombuffer(element.value, dtype="<u2" if little else ">u2")[:entries]
        else:
            lut = np.asarray(list(element.value), dtype=np.float64)[:entries]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DataError(f"DICOM file {label} has an invalid VOI LUT Sequence; remove it or fix LUTDescriptor/LUTData") from None
    if not 1 <= bits <= 16 or lut.size == 0:
        raise DataError(f"DICOM file {label} has an invalid VOI LUT ({bits} bits, {lut.size} entries)")
    index = np.clip(np.rint(values).astype(np.int64) - first_map, 0, lut.size - 1)
    output = lut.astype(np.float64)[index]
    return np.clip(np.rint(output / (2**bits - 1) * 255.0), 0, 255).astype(np.uint8)


def _render_colour(ds: Any, stored: np.ndarray, photometric: str) -> Image.Image:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        stored = apply_color_lut(stored, ds)
    # pydicom has already converted YBR_FULL and YBR_FULL_422 to RGB.
    if stored.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 8) or 8) if photometric != "PALETTE COLOR" else 16
        top = float(2**bits - 1)
        stored = np.clip(np.rint(stored.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(stored))


def _frame_view(ds: Any, frame: int) -> Any:
    """Return a dataset whose top-level rescale and window are those of ``frame``.

    Enhanced multi-frame objects keep them in functional group sequences instead of the top level.
    """
    from pydicom.dataset import Dataset

    groups = []
    for sequence_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = ds.get(sequence_name)
        if not sequence:
            continue
        index = 0 if sequence_name.startswith("Shared") else frame
        if index < len(sequence):
            groups.append(sequence[index])
    if not groups:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta
    for keyword in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
                    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if group.get(macro):
                for element in group[macro][0]:
                    view[element.tag] = element
    return view


def _kept_meta(ds: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for keyword, key in KEPT_FIELDS.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        meta[key] = _plain(value)
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer_syntax is not None:
        meta["transfer_syntax"] = transfer_syntax.name
    sop = _uid_name(ds.get("SOPClassUID"))
    if sop:
        meta["sop_class"] = sop
    return meta


def _plain(value: Any) -> Any:
    """Convert pydicom values (MultiValue, DSfloat, IS) to JSON-ready Python values."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(item) for item in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value).strip()


def _uid_name(uid: Any) -> str | None:
    if uid is None:
        return None
    name = getattr(uid, "name", "")
    # An unknown UID's name is the UID itself, which may encode a site; keep registered names only.
    return name if name and name != str(uid) else None


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_field(ds: Any, keyword: str, label: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"DICOM file {label} has an invalid or missing {keyword} ({value!r})") from None


def _num_frames(ds: Any, label: str) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return max(int(value or 1), 1)
    except (TypeError, ValueError):
        raise DataError(f"DICOM file {label} has an invalid NumberOfFrames ({value!r})") from None


def _first_line(exc: BaseException) -> str:
    """Return the exception text on one line, at most 240 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."
