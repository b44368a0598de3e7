"""LLaVA-Med importer: instruction data, VQA ground truth and question files.

    python -m hscr import llava-med path/to/llava_med_instruct_10k.json --images path/to/images

- Instruction data (``llava_med_instruct_*.json``): ``{id, image, domain, conversations}``; each
  human/gpt turn pair becomes a ``train`` sample (source id ``<id>#<turn>``). Later turns are
  imported without the earlier ones as context.
- VQA ground truth (older eval code): ``{id, image, answer_type, conversations}``, also with the
  misspelled key ``conversatons``; imported as ``test``.
- Question file (JSONL ``{question_id, image, text}``): imported as ``test``, with the answer of
  the ground-truth record of the same id when one is in the same import, else an empty answer.
  Answer files (JSONL with ``answer_id``/``model_id``) are model outputs and are skipped.

PATH is one of these files or a folder holding them. Image names are relative to ``--images``,
else to ``images/`` beside the file, else to the file's folder.
"""

from __future__ import annotations

import re
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
    read_jsonl,
    require_path,
    safe_join,
)
from hscr.datasets.ingest import ingest
from hscr.errors import DataError
from hscr.store import Store

FORMAT = "llava-med"
DEFAULT_NAME = "llava-med"
EXPECTED = (
    "a JSON array of {id, image, conversations} records (instruction data or VQA ground truth) "
    "or a JSONL question file of {question_id, image, text}"
)
IMAGE_DIRS = ("images", "imgs")
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


def _file_kind(path: Path) -> str | None:
    """Return 'instruct', 'eval', 'questions' or 'answers' for one file, else None."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    record = first_record(path)
    if record is None:
        return None
    keys = record.keys()
    if "answer_id" in keys or "model_id" in keys:
        return "answers"
    if {"question_id", "text"} <= keys:
        return "questions"
    if "image" in keys and ("conversations" in keys or "conversatons" in keys):
        return "eval" if "answer_type" in keys else "instruct"
    return None


def _data_files(path: Path) -> dict[Path, str]:
    if path.is_file():
        kind = _file_kind(path)
        return {path: kind} if kind else {}
    files = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl"))
    return {file: kind for file in files if (kind := _file_kind(file)) is not None}


def detect(path: Path) -> str | None:
    """Return the kinds of LLaVA-Med files found at ``path`` (comma-joined), or None."""
    kinds = sorted({kind for kind in _data_files(Path(path)).values() if kind != "answers"})
    return ",".join(kinds) or None


def import_path(store: Store, path: Path, options: ImportOptions) -> ImportReport:
    path = require_path(path, FORMAT)
    files = _data_files(path)
    usable = {file: kind for file, kind in files.items() if kind != "answers"}
    if not usable:
        raise DataError(f"no LLaVA-Med data found in {path}: expected {EXPECTED}")
    report = ImportReport(dataset=options.name or DEFAULT_NAME, layout=",".join(sorted(set(usable.values()))))
    for file, kind in files.items():
        if kind == "answers":
            report.warnings.append(f"{file.name} is a model answer file, not ground truth; skipped")
    rows = _rows(usable, options.image_root, report)
    return ingest(store, report.dataset, rows, report, lang_filter(options.lang, "all"), options.progress)


def _rows(files: dict[Path, str], image_root: Path | None, report: ImportReport) -> Iterator[SourceRow]:
    # Ground truth is read first so question files can take their answers from it.
    order = {"instruct": 0, "eval": 1, "questions": 2}
    truth: dict[str, str] = {}
    for file, kind in sorted(files.items(), key=lambda item: (order[item[1]], item[0].name)):
        image_dir = find_image_dir(file.parent, IMAGE_DIRS, image_root)
        if kind == "questions":
            yield from _question_rows(file, image_dir, truth, report)
            continue
        for index, record in enumerate(read_json_records(file)):
            where = f"{file.name} record {index}"
            if not isinstance(record, dict):
                yield SourceRow(where=where, split="train", image=None, question=None, answer=None,
                                missing_reason="record is not a JSON object")
                continue
            if record.get("id") is not None:
                where += f" (id {record['id']})"
            yield from _conversation_rows(record, kind, where, image_dir, truth)


def _conversation_rows(
    record: dict[str, Any], kind: str, where: str, image_dir: Path, truth: dict[str, str]
) -> Iterator[SourceRow]:
    split = "train" if kind == "instruct" else "test"
    image, reason = _image_source(image_dir, record.get("image"))
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list):
        yield SourceRow(where=where, split=split, image=image, question=None, answer=None, missing_reason=reason)
        return
    pairs = _turn_pairs(turns)
    if not pairs:
        yield SourceRow(where=where, split=split, image=image, question=None, answer=None, missing_reason=reason)
        return
    meta: dict[str, Any] = {"kind": kind, "image": record.get("image")}
    if isinstance(record.get("domain"), dict):
        meta["domain"] = [name for name, flag in record["domain"].items() if flag]
    record_id = None if record.get("id") is None else str(record["id"])
    for turn, (question, answer) in enumerate(pairs):
        if turn == 0 and record_id is not None:
            truth[record_id] = answer
        source_id = record_id if len(pairs) == 1 else f"{record_id}#{turn}"
        yield SourceRow(
            where=where if len(pairs) == 1 else f"{where} turn {turn}",
            split=split,
            image=image,
            question=question,
            answer=answer,
            answer_type=record.get("answer_type"),
            source_id=source_id,
            meta=dict(meta, turn=turn) if len(pairs) > 1 else meta,
            missing_reason=reason,
        )


def _turn_pairs(turns: list[Any]) -> list[tuple[str, str]]:
    """Pair each human turn with the gpt turn after it; the ``<image>`` token is removed."""
    pairs = []
    pending: str | None = None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        speaker = str(turn.get("from", "")).lower()
        text = str(turn.get("value") or "")
        if speaker == "human":
            pending = _IMAGE_TOKEN.sub(" ", text).strip()
        elif speaker in ("gpt", "assistant") and pending is not None:
            pairs.append((pending, text))
            pending = None
    return pairs


def _question_rows(file: Path, image_dir: Path, truth: dict[str, str], report: ImportReport) -> Iterator[SourceRow]:
    unanswered = 0
    for index, record in enumerate(read_jsonl(file)):
        where = f"{file.name} line {index + 1}"
        if not isinstance(record, dict):
            yield SourceRow(where=where, split="test", image=None, question=None, answer=None,
                            missing_reason="line is not a JSON object")
            continue
        question_id = record.get("question_id")
        if question_id is not None:
            where += f" (question_id {question_id})"
        image, reason = _image_source(image_dir, record.get("image"))
        answer = truth.get(str(question_id)) if question_id is not None else None
        if answer is None:
            unanswered += 1
        question = _IMAGE_TOKEN.sub(" ", str(record.get("text") or "")).strip()
        yield SourceRow(
            where=where,
            split="test",
            image=image,
            question=question,
            answer=answer or "",
            source_id=None if question_id is None else str(question_id),
            meta={"kind": "questions", "image": record.get("image"), "has_answer": answer is not None},
            missing_reason=reason,
            allow_empty_answer=True,
        )
    if unanswered:
        report.warnings.append(
            f"{file.name}: {unanswered} question(s) have no ground-truth answer in this import; "
            "they were imported with an empty answer, for generation with the model's own answer"
        )


def _image_source(image_dir: Path, name: Any) -> tuple[ImageSource | None, str | None]:
    if not isinstance(name, str) or not name.strip():
        return None, "missing image"
    path = safe_join(image_dir, name)
    if path is None:
        return None, f"image {name!r} points outside {image_dir}"
    if not path.is_file():
        return None, f"image file {name!r} not found in {image_dir}"
    return ImageSource(name=name.strip(), path=path), None
