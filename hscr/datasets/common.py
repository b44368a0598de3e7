"""Shared pieces of the importers: options, report, rows, answer cleaning and file readers.

A format module turns its files into :class:`SourceRow` objects and hands them to
:func:`hscr.datasets.ingest.ingest`, which cleans the text, loads each image once, writes the
rows and fills the :class:`ImportReport` (counts, duplicates, leaks, one line per problem).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from hscr.errors import DataError

YES_NO = {"yes", "no"}
# Closed-question answers of the Chinese SLAKE split (yes/no, contains/does not contain, has/has not, can/cannot).
CHINESE_YES_NO = {"是", "是的", "不是", "否", "包含", "不包含", "有", "没有", "可以", "不可以"}
# Zip members above this size are rejected before they are read (a zip bomb guard).
MAX_MEMBER_BYTES = 512 * 1024 * 1024


@dataclass
class ImportOptions:
    name: str | None = None
    split: str = "train"
    lang: str | None = None                # en, zh, all; None means the format's default
    image_root: Path | None = None         # overrides the detected image folder
    progress: bool = False


@dataclass
class ImportReport:
    """Counts, warnings and errors of one import; ``to_json`` is the last line of ``import --json``."""

    dataset: str
    layout: str = ""
    imported: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    skipped: int = 0
    filtered: int = 0                      # rows of a language that ``--lang`` left out
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, split: str) -> None:
        self.imported[split] = self.imported.get(split, 0) + 1

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "layout": self.layout,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "filtered": self.filtered,
            "warnings": self.warnings,
            "errors": self.errors,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass
class ImageSource:
    """The source of a row's image: a file, or bytes read on demand (Parquet cell, zip member)."""

    name: str                              # shown in messages and leak warnings
    path: Path | None = None
    reader: Callable[[], bytes] | None = None
    frame: int = 0
    stable_key: str | None = None          # unique name of a reader's bytes (zip member), if any

    @property
    def key(self) -> str | None:
        """A name that always refers to the same bytes, or None (Parquet cells)."""
        return str(self.path) if self.path is not None else self.stable_key

    def exists(self) -> bool:
        return self.reader is not None or (self.path is not None and self.path.is_file())

    def read_bytes(self) -> bytes:
        if self.reader is not None:
            return self.reader()
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class SourceRow:
    """One question as the dataset file contains it, before cleaning."""

    where: str                             # names the file and record for messages
    split: str
    image: ImageSource | None
    question: Any
    answer: Any
    answer_type: Any = None
    lang: str = "en"
    source_id: str | None = None
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    missing_reason: str | None = None      # why ``image`` is None
    allow_empty_answer: bool = False       # question files: the model's own answer can serve as y_w


def clean_text(value: Any) -> str:
    """Collapse tabs, newlines and repeated spaces; integers become their digits."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


# Short answers (VQA labels such as "yes." or "left lung.") lose a trailing period; longer,
# sentence-style answers (LLaVA-Med conversations) keep it because it is part of the response.
SHORT_ANSWER_WORDS = 5


def clean_answer(value: Any) -> str:
    """Clean an answer: whitespace collapsed, a short answer's trailing period dropped, yes/no lowercased.

    Other answers keep their case and commas, so multi-part answers stay as the dataset wrote them.
    """
    text = clean_text(value)
    if text.endswith(".") and not text.endswith("..") and len(text.split()) <= SHORT_ANSWER_WORDS:
        text = text[:-1].rstrip()
    if text.lower() in YES_NO:
        text = text.lower()
    return text


def is_yes_no(answer: str) -> bool:
    text = answer.strip().rstrip(".").strip()
    return text.lower() in YES_NO or text in CHINESE_YES_NO


def infer_answer_type(answer: str, given: Any = None) -> str:
    """Return 'closed' or 'open' from a dataset's field, else closed when the answer is yes/no."""
    if given is not None and str(given).strip():
        text = str(given).strip().lower()
        if text in ("closed", "yes/no", "close", "yes_no", "yesno"):
            return "closed"
        if text in ("open", "other"):
            return "open"
    return "closed" if is_yes_no(answer) else "open"


def normalize_split(name: str) -> str:
    """Map split spellings (validate, val, dev) to train / validation / test."""
    text = name.strip().lower()
    if text in ("val", "valid", "validate", "validation", "dev"):
        return "validation"
    if text in ("train", "training", "trainset"):
        return "train"
    if text in ("test", "testing", "testset"):
        return "test"
    return text


def require_path(path: Path, fmt: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{fmt} dataset path not found: {path}")
    return path


def read_json(path: Path) -> Any:
    """Read a JSON file, turning decoding problems into a DataError that names the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8 and import again") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Read a JSON array of objects."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path} must contain a JSON array of records, found {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[Any]:
    """Read JSON Lines; a bad line raises naming the line number."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8 and import again") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
    return records


def unreadable_json(path: Path) -> list[str]:
    """Describe the JSON and JSON Lines files at ``path`` (a file, or a folder's top level) that cannot be read.

    Layout detection skips such files silently, so a failed detection quotes these problems.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.glob("*.json*") if p.is_file())
    problems = []
    for file in files:
        try:
            if file.suffix == ".jsonl":
                read_jsonl(file)
            elif file.suffix == ".json":
                read_json_records(file)
        except DataError as exc:
            problems.append(str(exc))
    return problems


def first_record(path: Path) -> dict[str, Any] | None:
    """Return the first object of a JSON array or JSON Lines file, or None; for layout detection."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)
                        return record if isinstance(record, dict) else None
            return None
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0]
    return None


def zip_member_reader(archive: Path, member: str) -> Callable[[], bytes]:
    """Return a function that reads one member of a zip file, refusing oversized members."""

    def read() -> bytes:
        with zipfile.ZipFile(archive) as zipped:
            info = zipped.getinfo(member)
            if info.file_size > MAX_MEMBER_BYTES:
                raise DataError(f"{archive}:{member} unpacks to {info.file_size:,} bytes, over the {MAX_MEMBER_BYTES:,} limit")
            return zipped.read(member)

    return read


def lang_filter(option: str | None, default: str) -> set[str] | None:
    """Return the languages to keep, or None for all."""
    value = option or default
    return None if value == "all" else {value}


def find_image_dir(root: Path, candidates: Iterable[str], override: Path | None = None) -> Path:
    """Return the first existing candidate folder under ``root`` (or ``override``), else ``root``."""
    if override is not None:
        if not Path(override).is_dir():
            raise DataError(f"image folder not found: {override}")
        return Path(override)
    for name in candidates:
        folder = root / name
        if folder.is_dir():
            return folder
    return root


def safe_join(folder: Path, name: str) -> Path | None:
    """Join an image name from a data file to its folder; None when it points outside the folder."""
    name = name.strip().replace("\\", "/")
    if not name:
        return None
    resolved = (folder / name).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        return None
    return resolved


_SPLIT_FROM_FILE = re.compile(r"^(?P<split>[a-z]+)[-_.]", re.IGNORECASE)


def split_from_filename(name: str) -> str | None:
    """Return the split named by a Hugging Face Parquet shard such as ``train-00000-of-00001.parquet``."""
    match = _SPLIT_FROM_FILE.match(name)
    return normalize_split(match.group("split")) if match else None


def parquet_source_rows(files: list[Path], fmt: str, batch_size: int = 64) -> Iterator[SourceRow]:
    """Yield rows of Hugging Face Parquet shards (columns image, question, answer), batch by batch.

    The split comes from the shard name; the source id is ``<shard>:<row number>``.
    """
    import pyarrow.parquet as pq

    for path in files:
        split = split_from_filename(path.name)
        if split is None:
            raise DataError(f"cannot tell the split of {path}: expected a name like train-00000-of-00001.parquet")
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses that vary by version
            raise DataError(f"{path} is not a readable Parquet file ({exc}); download it again") from None
        columns = set(parquet.schema_arrow.names)
        missing = [name for name in ("image", "question", "answer") if name not in columns]
        if missing:
            raise DataError(f"{path} lacks the column(s) {', '.join(missing)} of the {fmt} Hugging Face copy")
        number = 0
        for batch in parquet.iter_batches(batch_size=batch_size, columns=["image", "question", "answer"]):
            for record in batch.to_pylist():
                where = f"{path.name} row {number}"
                image, reason = parquet_image(record, where)
                yield SourceRow(
                    where=where,
                    split=split,
                    image=image,
                    question=record.get("question"),
                    answer=record.get("answer"),
                    source_id=f"{path.name}:{number}",
                    missing_reason=reason,
                )
                number += 1


def parquet_image(record: dict[str, Any], where: str) -> tuple[ImageSource | None, str | None]:
    """Return the image of a Hugging Face ``Image`` cell (a dict of bytes and path)."""
    cell = record.get("image")
    if isinstance(cell, dict) and cell.get("bytes"):
        data = cell["bytes"]
        name = cell.get("path") or where
        return ImageSource(name=str(name), reader=lambda: data), None
    if isinstance(cell, (bytes, bytearray)) and cell:
        data = bytes(cell)
        return ImageSource(name=where, reader=lambda: data), None
    return None, "the image cell is empty"


def find_parquet(path: Path) -> list[Path]:
    """Return the Parquet shards of a Hugging Face dataset folder (``data/`` or the folder itself)."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    files = sorted(path.glob("data/*.parquet")) or sorted(path.glob("*.parquet"))
    return files
