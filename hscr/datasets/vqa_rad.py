"""VQA-RAD importer: the OSF release, the MEVF split and the Hugging Face Parquet copy.

    python -m hscr import vqa-rad "path/to/VQA-RAD" --db data/hscr.duckdb

- OSF: ``VQA_RAD Dataset Public.json`` plus ``VQA_RAD Image Folder/``; the split is in
  ``phrase_type`` (``test_freeform`` and ``test_para`` are test, the rest train).
- MEVF: ``trainset.json`` and ``testset.json`` plus ``images/``.
- Hugging Face (flaviagiammarino/vqa-rad): ``data/{train,test}-*.parquet`` with image bytes,
  question and answer only, so closed questions are inferred from yes/no answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from hscr.datasets.common import (
    ImageSource,
    ImportOptions,
    ImportReport,
    SourceRow,
    find_image_dir,
    find_parquet,
    first_record,
    lang_filter,
    parquet_source_rows,
    read_json_records,
    require_path,
    safe_join,
)
from hscr.datasets.ingest import ingest
from hscr.errors import DataError
from hscr.store import Store

FORMAT = "vqa-rad"
DEFAULT_NAME = "vqa-rad"
EXPECTED = (
    "'VQA_RAD Dataset Public.json' (OSF release), trainset.json/testset.json (MEVF split) "
    "or data/*.parquet (Hugging Face copy)"
)
OSF_FILE = "VQA_RAD Dataset Public.json"
IMAGE_DIRS = ("VQA_RAD Image Folder", "images", "imgs", "VQA_RAD Images")
# Fields stored in sample columns; the rest of each record (image_name included) goes to meta.
CORE_KEYS = {"qid", "question", "answer", "answer_type", "phrase_type"}


def detect(path: Path) -> str | None:
    """Return the layout name ('osf', 'mevf', 'parquet') found at ``path``, or None."""
    path = Path(path)
    if path.is_file():
        if path.name == OSF_FILE or (path.suffix == ".json" and _looks_like_records(path)):
            return "osf" if _is_osf_record(first_record(path)) else "mevf"
        if path.suffix == ".parquet":
            return "parquet"
        return None
    if not path.is_dir():
        return None
    if (path / OSF_FILE).is_file():
        return "osf"
    for name in ("trainset.json", "testset.json"):
        if (path / name).is_file() and _looks_like_records(path / name):
            return "mevf"
    if find_parquet(path):
        # NOTE: the VQA-RAD and PathVQA Hugging Face copies have the same columns, so a PathVQA
        # Parquet folder passes this check too; only the split names (validation) differ.
        return "parquet"
    return None


def _looks_like_records(path: Path) -> bool:
    record = first_record(path)
    return record is not None and {"qid", "image_name", "question", "answer"} <= record.keys()


def _is_osf_record(record: dict[str, Any] | None) -> bool:
    return record is not None and "qid_linked_id" in record


def import_path(store: Store, path: Path, options: ImportOptions) -> ImportReport:
    path = require_path(path, FORMAT)
    layout = detect(path)
    if layout is None:
        raise DataError(f"{path} is not a VQA-RAD dataset: expected {EXPECTED}")
    report = ImportReport(dataset=options.name or DEFAULT_NAME, layout=layout)
    folder = path if path.is_dir() else path.parent
    if layout == "parquet":
        rows = parquet_source_rows(find_parquet(path), FORMAT)
    else:
        if path.is_file():
            files = [path]
        elif layout == "osf":
            files = [path / OSF_FILE]
        else:
            files = [path / name for name in ("trainset.json", "testset.json") if (path / name).is_file()]
        image_dir = find_image_dir(folder, IMAGE_DIRS, options.image_root)
        rows = _json_rows(files, image_dir, layout)
    return ingest(store, report.dataset, rows, report, lang_filter(options.lang, "all"), options.progress)


def _json_rows(files: list[Path], image_dir: Path, layout: str) -> Iterator[SourceRow]:
    for file in files:
        records = read_json_records(file)
        for index, record in enumerate(records):
            where = f"{file.name} record {index}"
            if not isinstance(record, dict):
                yield SourceRow(where=where, split="train", image=None, question=None, answer=None,
                                missing_reason="record is not a JSON object")
                continue
            qid = record.get("qid")
            if qid is not None:
                where += f" (qid {qid})"
            yield _json_row(record, file, where, image_dir, layout)


def _json_row(record: dict[str, Any], file: Path, where: str, image_dir: Path, layout: str) -> SourceRow:
    phrase_type = str(record.get("phrase_type") or "").strip().lower()
    if layout == "osf" or file.name not in ("trainset.json", "testset.json"):
        split = "test" if phrase_type.startswith("test") else "train"
    else:
        split = "test" if file.name == "testset.json" else "train"

    image_name = str(record.get("image_name") or "").strip()
    image_path = safe_join(image_dir, image_name) if image_name else None
    image = ImageSource(name=image_name, path=image_path) if image_path is not None else None
    reason = None
    if image is None:
        reason = "missing image_name" if not image_name else f"image_name {image_name!r} points outside {image_dir}"
    elif not image_path.is_file():
        reason = f"image file {image_name!r} not found in {image_dir}"

    meta = {key: value for key, value in record.items() if key not in CORE_KEYS}
    if phrase_type:
        meta["phrase_type"] = phrase_type
    return SourceRow(
        where=where,
        split=split,
        image=image,
        question=record.get("question"),
        answer=record.get("answer"),
        answer_type=record.get("answer_type"),
        source_id=None if record.get("qid") is None else str(record["qid"]),
        meta=meta,
        missing_reason=reason,
    )
