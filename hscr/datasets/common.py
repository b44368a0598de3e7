"""Shared pieces of the importers: the report, answer normalization and image caching."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hscr.errors import DataError
from hscr.images import load_image_file
from hscr.store import Store

YES_NO = {"yes", "no"}


@dataclass
class ImportOptions:
    name: str | None = None
    split: str = "train"
    lang: str = "en"


@dataclass
class ImportReport:
    """What an import did; ``to_json`` is the last line of ``import --json``."""

    dataset: str
    imported: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, split: str) -> None:
        self.imported[split] = self.imported.get(split, 0) + 1

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> str:
        return json.dumps(
            {
                "dataset": self.dataset,
                "imported": self.imported,
                "duplicates": self.duplicates,
                "skipped": self.skipped,
                "warnings": self.warnings,
                "errors": self.errors,
            },
            ensure_ascii=False,
        )


def clean_text(value: Any) -> str:
    """Collapse tabs, newlines and repeated spaces; integers become their digits."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


def infer_answer_type(answer: str, given: Any = None) -> str:
    """Return 'closed' or 'open' from a dataset's field, else closed when the answer is yes/no."""
    if given is not None and str(given).strip():
        text = str(given).strip().lower()
        if text in ("closed", "yes/no", "close"):
            return "closed"
        if text in ("open", "other"):
            return "open"
    return "closed" if answer.strip().rstrip(".").lower() in YES_NO else "open"


class ImageCache:
    """Load each source image file once per import and store it content-addressed."""

    def __init__(self, store: Store):
        self.store = store
        self._ids: dict[Path, str] = {}

    def image_id(self, path: Path, cursor=None, modality: str | None = None) -> str:
        path = Path(path)
        if path in self._ids:
            return self._ids[path]
        loaded = load_image_file(path)
        image_id = self.store.add_image(
            loaded.png_bytes(),
            loaded.image.width,
            loaded.image.height,
            modality=modality or loaded.modality,
            source_format=loaded.source_format,
            meta=loaded.meta,
            cursor=cursor,
        )
        self._ids[path] = image_id
        return image_id


def require_dir(path: Path, fmt: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{fmt} dataset path not found: {path}")
    return path
