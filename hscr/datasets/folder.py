"""Import a folder of images (PNG, JPEG, TIFF, BMP or DICOM) with a ``samples.csv``.

    python -m hscr import folder path/to/folder --name my-cases --db data/hscr.duckdb

Required columns: ``image`` (path relative to the folder), ``question``, ``answer``. Optional:
``answer_type`` (open/closed; inferred from yes/no answers when missing), ``split`` (default:
the ``--split`` option), ``lang`` (default en), ``id`` (kept as the source id, default the CSV
line number) and ``frame`` (frame of a multi-frame DICOM, default 0).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from hscr.datasets.common import (
    ImageSource,
    ImportOptions,
    ImportReport,
    SourceRow,
    clean_text,
    lang_filter,
    normalize_split,
    require_path,
    safe_join,
)
from hscr.datasets.ingest import ingest
from hscr.errors import DataError
from hscr.store import Store

FORMAT = "folder"
EXPECTED = "samples.csv with columns image,question,answer beside the images"
REQUIRED = ("image", "question", "answer")


def detect(path: Path) -> str | None:
    """Return 'csv' when ``path`` is a CSV file or a folder with ``samples.csv``, else None."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if path.is_dir() and (path / "samples.csv").is_file():
        return "csv"
    return None


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{csv_path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8 and import again"
        ) from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise DataError(f"{csv_path} is missing the column(s) {', '.join(missing)}; expected image,question,answer")
    return [{(k or "").strip(): v for k, v in row.items()} for row in reader]


def import_path(store: Store, path: Path, options: ImportOptions) -> ImportReport:
    path = require_path(path, FORMAT)
    if path.is_file() and path.suffix.lower() == ".csv":
        csv_path, folder = path, path.parent
    else:
        csv_path, folder = path / "samples.csv", path
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: a folder import needs {EXPECTED}")
    report = ImportReport(dataset=options.name or folder.resolve().name, layout="csv")
    rows = _rows(read_rows(csv_path), csv_path, folder.resolve(), options)
    return ingest(store, report.dataset, rows, report, lang_filter(options.lang, "all"), options.progress)


def _rows(records: list[dict[str, str]], csv_path: Path, root: Path, options: ImportOptions) -> Iterator[SourceRow]:
    for line, record in enumerate(records, start=2):
        where = f"{csv_path.name} line {line}"
        image_name = (record.get("image") or "").strip()
        image, reason = None, None
        frame_text = clean_text(record.get("frame")) or "0"
        if not frame_text.isdigit():
            reason = f"invalid frame {frame_text!r}; expected a frame number from 0"
        elif not image_name:
            reason = "empty image"
        else:
            image_path = safe_join(root, image_name)
            if image_path is None:
                reason = f"image path {image_name!r} points outside {root}"
            elif not image_path.is_file():
                reason = f"image file {image_name!r} not found in {root}"
            else:
                image = ImageSource(name=image_name, path=image_path, frame=int(frame_text))
        yield SourceRow(
            where=where,
            split=normalize_split(clean_text(record.get("split")) or options.split),
            image=image,
            question=record.get("question"),
            answer=record.get("answer"),
            answer_type=record.get("answer_type"),
            lang=clean_text(record.get("lang")).lower() or "en",
            source_id=clean_text(record.get("id")) or str(line),
            missing_reason=reason,
        )
