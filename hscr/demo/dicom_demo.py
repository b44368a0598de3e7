"""The ``demo-dicom`` dataset: the real CT and MR slices that ship with pydicom.

Questions are answered from the DICOM header: the modality always, the body part and the image
plane where the header has them. Only the de-identified fields that :func:`hscr.images.load_any`
keeps reach the database.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hscr.demo.phantoms import QA
from hscr.errors import DataError
from hscr.store import Store

logger = logging.getLogger(__name__)

DATASET = "demo-dicom"
SPLIT = "test"
FILES = ("CT_small.dcm", "MR_small.dcm")

# DICOM Modality code -> the answer word the demo model and SLAKE use.
MODALITY_WORDS = {"CT": "ct", "MR": "mri", "CR": "x-ray", "DX": "x-ray", "US": "ultrasound", "PT": "pet"}
_MODALITY_QUESTION = {"ct": "Is this a CT scan?", "mri": "Is this an MRI?", "x-ray": "Is this an X-ray?"}


def dicom_paths() -> list[Path]:
    """Paths of the pydicom test files, which are installed with the package."""
    from pydicom.data import get_testdata_file

    paths = []
    for name in FILES:
        found = get_testdata_file(name)
        if not found:
            raise DataError(f"pydicom's test file {name} is missing; reinstall pydicom (pip install --force-reinstall pydicom)")
        paths.append(Path(found))
    return paths


def image_plane(orientation) -> str | None:
    """Name the plane (axial, coronal, sagittal) of an Image Orientation (Patient) value."""
    if orientation is None or len(orientation) != 6:
        return None
    import numpy as np

    row, column = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    normal = np.abs(np.cross(row, column))
    # The slice normal points along the patient axis the plane is perpendicular to: x, y or z.
    return ("sagittal", "coronal", "axial")[int(normal.argmax())]


def header_questions(modality_code: str | None, body_part: str | None, plane: str | None) -> list[QA]:
    """Questions whose answers come from the header fields given."""
    qas: list[QA] = []
    modality = MODALITY_WORDS.get((modality_code or "").upper())
    if modality:
        qas.append(QA("What modality is this image?", modality, "open", "modality", False))
        for other, question in _MODALITY_QUESTION.items():
            qas.append(QA(question, "yes" if other == modality else "no", "closed", "modality_yes_no", False))
    if body_part:
        qas.append(QA("Which part of the body is this?", body_part.strip().lower(), "open", "body_part", False))
    if plane:
        qas.append(QA("In which plane is this image?", plane, "open", "plane", False))
    return qas


def _orientation(path: Path):
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageOrientationPatient"])
    return header.get("ImageOrientationPatient")


def import_dicom_demo(store: Store) -> dict[str, int]:
    """Store the pydicom slices and their header questions; returns inserted and existing counts."""
    from hscr.images import load_any
    from hscr.pixels import save_window_pixels

    counts = {"inserted": 0, "existing": 0}
    for path in dicom_paths():
        loaded = load_any(path)
        modality_code = loaded.meta.get("modality") or loaded.modality
        qas = header_questions(modality_code, loaded.meta.get("body_part"), image_plane(_orientation(path)))
        if not qas:
            logger.warning("%s has no modality in its header; no questions added", path.name)
            continue
        with store.transaction() as cur:
            image_id = store.add_image(loaded.png_bytes(), loaded.image.width, loaded.image.height,
                                       modality=MODALITY_WORDS.get(str(modality_code).upper()),
                                       source_format="dicom", meta=loaded.meta, cursor=cur)
            save_window_pixels(store.image_dir / f"{image_id}.png", loaded)
            for qa in qas:
                _, inserted = store.add_sample(DATASET, SPLIT, image_id, qa.question, qa.answer, qa.answer_type,
                                               source_id=path.name, meta={"family": qa.family}, cursor=cur)
                counts["inserted" if inserted else "existing"] += 1
    return counts
