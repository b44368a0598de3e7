"""SLAKE 1.0 importer: the original layout and the Hugging Face copy (BoKelvin/SLAKE).

    python -m hscr import slake path/to/Slake1.0 --lang en --db data/hscr.duckdb

Both layouts hold ``train.json``, ``test.json`` and a validation file (``validate.json`` in the
original, ``validation.json`` in the Hugging Face copy), with images under ``imgs/`` or still
packed in ``imgs.zip``. Each record has ``q_lang`` (en or zh); ``--lang`` keeps one language
(default en) or ``all``. Leaks are checked across both languages, because some images of the
Chinese training split are English test images.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator

from hscr.datasets.common import (
    ImageSource,
    ImportOptions,
    ImportReport,
    SourceRow,
    find_image_dir,
    first_record,
    lang_filter,
    read_json_records,
    require_path,
    safe_join,
    zip_member_reader,
)
from hscr.datasets.ingest import ingest
from hscr.errors import DataError
from hscr.store import Store

FORMAT = "slake"
DEFAULT_NAME = "slake"
EXPECTED = "train.json, validate.json or validation.json, test.json with q_lang/img_name records, and imgs/ or imgs.zip"
SPLIT_FILES = (
    ("train", "train.json"),
    ("validation", "validate.json"),
    ("validation", "validation.json"),
    ("test", "test.json"),
)
# Fields stored in sample columns; the rest of each record (img_name included) goes to meta.
CORE_KEYS = {"qid", "question", "answer", "answer_type", "q_lang", "modality"}


def detect(path: Path) -> str | None:
    """Return 'original' or 'huggingface' when ``path`` contains SLAKE split files, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    found = [name for _, name in SPLIT_FILES if (path / name).is_file()]
    if not found:
        return None
    record = first_record(path / found[0])
    if record is None or not {"img_name", "question", "answer"} <= record.keys():
        return None
    return "huggingface" if "validation.json" in found else "original"


def import_path(store: Store, path: Path, options: ImportOptions) -> ImportReport:
    path = require_path(path, FORMAT)
    layout = detect(path)
    if layout is None:
        raise DataError(f"{path} is not a SLAKE dataset folder: expected {EXPECTED}")
    report = ImportReport(dataset=options.name or DEFAULT_NAME, layout=layout)
    images = _ImageLocator(path, options.image_root)
    if images.archive is not None:
        report.layout += "+imgs.zip"
    rows = _rows(path, images)
    return ingest(store, report.dataset, rows, report, lang_filter(options.lang, "en"), options.progress)


class _ImageLocator:
    """Find ``img_name`` under ``imgs/`` or, when the folder is absent, inside ``imgs.zip``."""

    def __init__(self, root: Path, override: Path | None):
        self.folder = find_image_dir(root, ("imgs",), override)
        self.archive: Path | None = None
        self.members: dict[str, str] = {}
        if override is None and not (root / "imgs").is_dir() and (root / "imgs.zip").is_file():
            self.archive = root / "imgs.zip"
            try:
                with zipfile.ZipFile(self.archive) as zipped:
                    names = zipped.namelist()
            except zipfile.BadZipFile:
                raise DataError(f"{self.archive} is not a valid zip file; download it again or unpack it to imgs/") from None
            # Members are "imgs/xmlab0/source.jpg" or "xmlab0/source.jpg" depending on how it was packed.
            for name in names:
                relative = name.split("imgs/", 1)[1] if name.startswith("imgs/") else name
                self.members[relative] = name

    def source(self, image_name: str) -> tuple[ImageSource | None, str | None]:
        if self.archive is not None:
            member = self.members.get(image_name.strip().lstrip("/"))
            if member is None:
                return None, f"image {image_name!r} not found in {self.archive}"
            reader = zip_member_reader(self.archive, member)
            return ImageSource(name=image_name, reader=reader, stable_key=f"{self.archive}:{member}"), None
        path = safe_join(self.folder, image_name)
        if path is None:
            return None, f"img_name {image_name!r} points outside {self.folder}"
        if not path.is_file():
            return None, f"image file {image_name!r} not found in {self.folder}"
        return ImageSource(name=image_name, path=path), None


def _rows(root: Path, images: _ImageLocator) -> Iterator[SourceRow]:
    for split, name in SPLIT_FILES:
        file = root / name
        if not file.is_file():
            continue
        for index, record in enumerate(read_json_records(file)):
            where = f"{name} record {index}"
            if not isinstance(record, dict):
                yield SourceRow(where=where, split=split, image=None, question=None, answer=None,
                                missing_reason="record is not a JSON object")
                continue
            if record.get("qid") is not None:
                where += f" (qid {record['qid']})"
            yield _row(record, split, where, images)


def _row(record: dict[str, Any], split: str, where: str, images: _ImageLocator) -> SourceRow:
    image_name = str(record.get("img_name") or "").strip()
    if image_name:
        image, reason = images.source(image_name)
    else:
        image, reason = None, "missing img_name"
    lang = str(record.get("q_lang") or "en").strip().lower()
    meta = {key: value for key, value in record.items() if key not in CORE_KEYS}
    modality = record.get("modality")
    if modality:
        meta["modality"] = modality
    return SourceRow(
        where=where,
        split=split,
        image=image,
        question=record.get("question"),
        answer=record.get("answer"),
        answer_type=record.get("answer_type"),
        lang=lang,
        source_id=None if record.get("qid") is None else str(record["qid"]),
        modality=str(modality) if modality else None,
        meta=meta,
        missing_reason=reason,
    )
