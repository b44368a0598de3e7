"""Import a folder of images with a ``samples.csv`` (columns image, question, answer).

Optional columns: ``answer_type`` (open/closed; inferred from yes/no answers when missing) and
``split`` (default: the ``--split`` option).
"""

from __future__ import annotations

import csv
from pathlib import Path

from hscr.datasets.common import ImageCache, ImportOptions, ImportReport, clean_text, infer_answer_type, require_dir
from hscr.errors import DataError, HSCRError
from hscr.store import Store

REQUIRED = ("image", "question", "answer")


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
    folder = require_dir(path, "folder")
    if folder.is_file() and folder.name.endswith(".csv"):
        csv_path, folder = folder, folder.parent
    else:
        csv_path = folder / "samples.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: a folder import needs samples.csv with columns image,question,answer")
    name = options.name or folder.resolve().name
    report = ImportReport(dataset=name)
    images = ImageCache(store)
    rows = read_rows(csv_path)
    root = folder.resolve()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path.name} line {line}"
        question = clean_text(row.get("question"))
        answer = clean_text(row.get("answer"))
        image_name = (row.get("image") or "").strip()
        if not question or not answer or not image_name:
            empty = [k for k, v in (("image", image_name), ("question", question), ("answer", answer)) if not v]
            report.errors.append(f"{where}: empty {', '.join(empty)}; row skipped")
            report.skipped += 1
            continue
        image_path = (root / image_name).resolve()
        if not image_path.is_relative_to(root):
            report.errors.append(f"{where}: image path {image_name!r} points outside {root}; row skipped")
            report.skipped += 1
            continue
        split = clean_text(row.get("split")) or options.split
        try:
            with store.transaction() as cur:
                image_id = images.image_id(image_path, cursor=cur)
                _, inserted = store.add_sample(
                    name, split, image_id, question, answer,
                    infer_answer_type(answer, row.get("answer_type")), lang=options.lang,
                    source_id=str(line), cursor=cur,
                )
        except HSCRError as exc:
            report.errors.append(f"{where}: {exc}")
            report.skipped += 1
            continue
        if inserted:
            report.count(split)
        else:
            report.duplicates += 1
    return report
