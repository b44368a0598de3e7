"""PathVQA importer: the original pickles and the Hugging Face Parquet copy.

    python -m hscr import pathvqa path/to/pvqa --db data/hscr.duckdb

- Original: ``images/{train,val,test}/<split>_NNNN.jpg`` and ``qas/<split>/<split>_qa.pkl``
  (a pickled list of ``{image, question, answer}``, image being the file stem). When
  ``qas/<split>_vqa.pkl`` is present its ``answer_type`` ("yes/no" or "other") and
  ``question_id`` are matched by image and question.
- Hugging Face (flaviagiammarino/path-vqa): ``data/{train,validation,test}-*.parquet``.

Pickles can run code when loaded, so they are read only from the path the user passes, with an
unpickler that accepts plain lists, dicts, strings and numbers and rejects everything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterator

from hscr.datasets.common import (
    ImageSource,
    ImportOptions,
    ImportReport,
    SourceRow,
    clean_text,
    find_parquet,
    lang_filter,
    normalize_split,
    parquet_source_rows,
    require_path,
    safe_join,
)
from hscr.datasets.ingest import ingest
from hscr.errors import DataError
from hscr.store import Store

FORMAT = "pathvqa"
DEFAULT_NAME = "pathvqa"
EXPECTED = "qas/<split>/<split>_qa.pkl with images/<split>/ (original release) or data/*.parquet (Hugging Face copy)"
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickle only built-in containers and scalars; any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only lists, dicts, strings and numbers are allowed")


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle that holds only plain data, raising DataError for anything else."""
    try:
        with open(path, "rb") as handle:
            return _PlainUnpickler(handle, encoding="utf-8").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} cannot be loaded safely: {exc}") from None
    except (EOFError, ValueError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); download it again") from None


def _root(path: Path) -> Path:
    """Return the folder holding ``qas/``: ``path`` itself or its ``pvqa`` child."""
    if (path / "qas").is_dir():
        return path
    if (path / "pvqa" / "qas").is_dir():
        return path / "pvqa"
    return path


def detect(path: Path) -> str | None:
    """Return 'original' or 'parquet' for a PathVQA layout at ``path``, else None."""
    path = Path(path)
    if path.is_dir():
        root = _root(path)
        if any((root / "qas" / split / f"{split}_qa.pkl").is_file() for split in SPLITS):
            return "original"
    if find_parquet(path):
        return "parquet"
    return None


def import_path(store: Store, path: Path, options: ImportOptions) -> ImportReport:
    path = require_path(path, FORMAT)
    layout = detect(path)
    if layout is None:
        raise DataError(f"{path} is not a PathVQA dataset: expected {EXPECTED}")
    report = ImportReport(dataset=options.name or DEFAULT_NAME, layout=layout)
    if layout == "parquet":
        rows = parquet_source_rows(find_parquet(path), FORMAT)
    else:
        root = _root(path)
        image_root = Path(options.image_root) if options.image_root else root / "images"
        rows = _pickle_rows(root, image_root)
    return ingest(store, report.dataset, rows, report, lang_filter(options.lang, "all"), options.progress)


def _pickle_rows(root: Path, image_root: Path) -> Iterator[SourceRow]:
    for split_dir in SPLITS:
        qa_file = root / "qas" / split_dir / f"{split_dir}_qa.pkl"
        if not qa_file.is_file():
            continue
        records = load_plain_pickle(qa_file)
        if not isinstance(records, list):
            raise DataError(f"{qa_file} must hold a list of question records, found {type(records).__name__}")
        extra = _vqa_index(root / "qas" / f"{split_dir}_vqa.pkl")
        split = normalize_split(split_dir)
        for index, record in enumerate(records):
            where = f"{qa_file.name} record {index}"
            if not isinstance(record, dict):
                yield SourceRow(where=where, split=split, image=None, question=None, answer=None,
                                missing_reason="record is not a dict")
                continue
            stem = str(record.get("image") or "").strip()
            image, reason = _image_source(image_root / split_dir, stem)
            question = record.get("question")
            info = extra.get((stem, clean_text(question).lower()), {})
            yield SourceRow(
                where=where,
                split=split,
                image=image,
                question=question,
                answer=record.get("answer"),
                answer_type=info.get("answer_type"),
                source_id=None if info.get("question_id") is None else str(info["question_id"]),
                meta={"image": stem, **{key: info[key] for key in ("question_type",) if info.get(key) is not None}},
                missing_reason=reason,
            )


def _image_source(folder: Path, stem: str) -> tuple[ImageSource | None, str | None]:
    if not stem:
        return None, "missing image"
    for suffix in ("",) + IMAGE_SUFFIXES:
        candidate = safe_join(folder, stem + suffix)
        if candidate is None:
            return None, f"image {stem!r} points outside {folder}"
        if candidate.is_file():
            return ImageSource(name=candidate.name, path=candidate), None
    return None, f"image file {stem}.jpg not found in {folder}"


def _vqa_index(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Index ``<split>_vqa.pkl`` by (image stem, lowercased question); empty when absent."""
    if not path.is_file():
        return {}
    records = load_plain_pickle(path)
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of question records, found {type(records).__name__}")
    index = {}
    for record in records:
        if isinstance(record, dict) and record.get("img_id") is not None:
            index[(str(record["img_id"]).strip(), clean_text(record.get("sent")).lower())] = record
    return index
