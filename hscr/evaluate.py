"""The evaluation run and LLaVA-Med answer files.

An evaluation run answers every sample of one dataset split with greedy decoding, scores each
answer under the "paper" and "strict" protocols (:mod:`hscr.metrics`), stores the predictions
with the model and adapter ids, and writes the answers in LLaVA-Med's JSONL format next to a
reference file, so that ``python -m hscr score`` re-scores them. The run id is a hash of the
model, the adapter, their files' sizes and times, the dataset, split, limit and settings: running
the same evaluation again resumes it and skips the samples it already answered.

    python -m hscr evaluate --model data/demo/model --db data/hscr.duckdb --dataset demo --split test
    python -m hscr score --predictions answers.jsonl --references test.json --json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hscr.config import EvalConfig, config_to_json
from hscr.datasets.common import infer_answer_type
from hscr.errors import DataError, HSCRError, ModelLoadError
from hscr.metrics import score_answer, summarize
from hscr.models.base import VLM
from hscr.store import Store

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


# -- LLaVA-Med answer and reference files ------------------------------------------------------


@dataclass
class Reference:
    answer: str
    answer_type: str          # 'open' or 'closed'


@dataclass
class FileScores:
    """Scores of a prediction file against a reference file, matched by question id."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]]                                   # question_id, answer_type, paper, strict
    missing_predictions: list[str] = field(default_factory=list)  # reference ids without a prediction
    missing_references: list[str] = field(default_factory=list)   # prediction ids without a reference


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None


def _json_lines(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def _record_id(record: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        value = record.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    raise DataError(f"{where}: missing field {' or '.join(keys)}")


def read_predictions(path: str | Path) -> dict[str, str]:
    """Read a LLaVA-Med answer file (JSONL ``{question_id, text}``): question id -> answer text."""
    path = Path(path)
    predictions: dict[str, str] = {}
    for number, record in _json_lines(path, _read_text(path, "predictions")):
        where = f"{path} line {number}"
        question_id = _record_id(record, ("question_id",), where)
        if "text" not in record:
            raise DataError(f"{where}: missing field text (the model's answer)")
        if question_id in predictions:
            raise DataError(f"{where}: duplicate question_id {question_id!r}; keep one answer per question")
        predictions[question_id] = "" if record["text"] is None else str(record["text"])
    return predictions


def _reference_answer(record: dict[str, Any], where: str) -> str:
    if "answer" in record:
        return "" if record["answer"] is None else str(record["answer"])
    # LLaVA-Med's ground-truth files spell the key both ways.
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list):
        raise DataError(f"{where}: missing field answer, conversations or conversatons")
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant"):
            return str(turn.get("value", ""))
    raise DataError(f"{where}: the conversation has no 'gpt' turn with the reference answer")


def read_references(path: str | Path) -> dict[str, Reference]:
    """Read reference answers: question id -> :class:`Reference`.

    Accepts LLaVA-Med's evaluation JSON array (``{id, answer_type, conversations}``, also
    spelled ``conversatons``) and JSONL or JSON arrays with ``question_id``, ``answer`` and
    ``answer_type``. A missing answer type is inferred (closed for yes/no answers).
    """
    path = Path(path)
    text = _read_text(path, "references")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        records = [(f"{path} item {index}", record) for index, record in enumerate(data)]
    else:
        records = [(f"{path} line {number}", record) for number, record in _json_lines(path, text)]

    references: dict[str, Reference] = {}
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        question_id = _record_id(record, ("question_id", "id", "qid"), where)
        answer = " ".join(_reference_answer(record, where).split())
        if question_id in references:
            raise DataError(f"{where}: duplicate id {question_id!r}; keep one reference per question")
        references[question_id] = Reference(answer, infer_answer_type(answer, record.get("answer_type")))
    return references


def score_files(predictions_path: str | Path, references_path: str | Path) -> FileScores:
    """Score a prediction file against references, matching by question id (never by order)."""
    predictions = read_predictions(predictions_path)
    references = read_references(references_path)
    common = [qid for qid in references if qid in predictions]
    if not common:
        raise DataError(
            f"no question id of {predictions_path} occurs in {references_path} "
            f"({len(predictions)} predictions, {len(references)} references); check that both files "
            "belong to the same dataset split"
        )
    rows = []
    for qid in common:
        reference = references[qid]
        scores = score_answer(predictions[qid], reference.answer, reference.answer_type)
        rows.append({"question_id": qid, "answer_type": reference.answer_type, **scores})
    return FileScores(
        summary=summarize(rows),
        rows=rows,
        missing_predictions=[qid for qid in references if qid not in predictions],
        missing_references=[qid for qid in predictions if qid not in references],
    )


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write records as JSON lines through a temporary file, so a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# -- models with adapters ----------------------------------------------------------------------


def check_adapter_path(adapter_path: str | Path) -> Path:
    """Return the adapter folder, or raise when it has no ``adapter_config.json``."""
    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter not found: {path} has no adapter_config.json; pass the folder that training saved "
            "(a checkpoint folder or the final adapter folder)"
        )
    return path


def load_adapter(vlm: VLM, adapter_path: str | Path) -> VLM:
    """Wrap the model of ``vlm`` with a saved PEFT (LoRA) adapter for inference."""
    from peft import PeftModel

    path = check_adapter_path(adapter_path)
    try:
        model = PeftModel.from_pretrained(vlm.model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the adapter in {path} onto {vlm.name}: {exc}") from None
    model.to(vlm.device)
    model.eval()
    return dataclasses.replace(vlm, model=model)


def _fingerprint(name_or_path: str | None) -> list[Any]:
    """Return the names, sizes and modification times of a local model folder's files."""
    if not name_or_path:
        return []
    path = Path(name_or_path)
    if not path.is_dir():
        return [str(name_or_path)]
    return sorted(
        (child.name, child.stat().st_size, child.stat().st_mtime_ns) for child in path.iterdir() if child.is_file()
    )


def eval_run_id(model: str, adapter: str | None, dataset: str, split: str, limit: int | None, config: EvalConfig) -> str:
    key = json.dumps(
        [model, adapter, _fingerprint(model), _fingerprint(adapter), dataset, split, limit, config_to_json(config)],
        default=str,
    )
    return "eval-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# -- the evaluation run ------------------------------------------------------------------------


def _samples_for(store: Store, dataset: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    rows = store.samples(dataset=dataset, split=split, limit=limit)
    if rows:
        return rows
    known = store.datasets()
    splits = [d["split"] for d in known if d["dataset"] == dataset]
    if splits:
        raise DataError(f"dataset {dataset!r} has no split {split!r} in {store.db_path}; its splits: {', '.join(splits)}")
    names = sorted({d["dataset"] for d in known})
    raise DataError(f"dataset {dataset!r} not found in {store.db_path}; known datasets: {', '.join(names) or 'none'}")


def _question_ids(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Map each prediction row's sample id -> question id: the dataset's own ids when they are unique, else sample ids."""
    source_ids = [row.get("source_id") for row in rows]
    if all(source_ids) and len(set(source_ids)) == len(source_ids):
        return {row["sample_id"]: str(row["source_id"]) for row in rows}
    return {row["sample_id"]: row["sample_id"] for row in rows}


def run_evaluation(
    vlm: VLM,
    store: Store,
    dataset: str,
    split: str = "test",
    limit: int | None = None,
    adapter_name: str | None = None,
    progress: bool | ProgressCallback = True,
    config: EvalConfig | None = None,
    answers_path: str | Path | None = None,
) -> dict[str, Any]:
    """Answer, score and store every sample of a dataset split; returns a summary dict.

    The summary has ``eval_run_id``, ``processed``, ``skipped`` (answered by an earlier try of the
    same run), ``errors`` (unreadable images), ``metrics`` (see :func:`hscr.metrics.summarize`)
    and the paths of the ``answers`` and ``references`` files. Each batch is written in one
    transaction, so an interrupted run loses at most the batch in flight.
    """
    from hscr.decoding import greedy_generate
    from hscr.images import open_stored

    config = config or EvalConfig()
    if limit is not None and limit < 1:
        raise HSCRError(f"invalid limit {limit}: expected a positive integer")
    rows = _samples_for(store, dataset, split, limit)
    run_id = eval_run_id(vlm.name, adapter_name, dataset, split, limit, config)
    store.execute(
        "INSERT INTO eval_runs (id, model, adapter, dataset, split, config_json) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING",
        [run_id, vlm.name, adapter_name, dataset, split, config_to_json(config)],
    )
    done = {r[0] for r in store.execute("SELECT sample_id FROM predictions WHERE eval_run_id = ?", [run_id]).fetchall()}
    todo = [row for row in rows if row["id"] not in done]
    summary: dict[str, Any] = {"eval_run_id": run_id, "processed": 0, "skipped": len(rows) - len(todo), "errors": []}
    logger.info("evaluation %s: %d samples of %s/%s, %d already answered", run_id, len(rows), dataset, split, len(rows) - len(todo))

    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="evaluate", unit="sample")
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start : start + config.batch_size]
        ready, images, cache = [], [], {}
        for row in chunk:
            try:
                if row["image_id"] not in cache:
                    cache[row["image_id"]] = open_stored(store.data_dir / row["image_path"])
            except OSError as exc:
                message = f"sample {row['id']}: cannot read image {row['image_path']}: {exc}"
                logger.error(message)
                summary["errors"].append(message)
                continue
            ready.append(row)
            images.append(cache[row["image_id"]])
        if ready:
            try:
                texts = greedy_generate(
                    vlm, images, [row["question"] for row in ready],
                    max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                )
            except torch.cuda.OutOfMemoryError:
                raise HSCRError(
                    f"out of GPU memory while answering {len(ready)} samples at once; the {summary['processed']} "
                    f"answers so far are stored, so run again with a smaller batch, for example "
                    f"--set batch_size={max(1, config.batch_size // 2)}"
                ) from None
            _write_predictions(store, run_id, vlm.name, adapter_name, ready, texts)
            summary["processed"] += len(ready)
        if bar is not None:
            bar.update(len(chunk))
        elif callable(progress):
            progress(start + len(chunk), len(todo))
    if bar is not None:
        bar.close()

    summary["metrics"] = _finish_run(store, run_id, summary["errors"])
    answers, references = write_answer_files(store, run_id, answers_path)
    summary["answers"], summary["references"] = str(answers), str(references)
    return summary


def evaluate_dataset(
    vlm: VLM,
    store: Store,
    dataset: str,
    split: str = "test",
    limit: int | None = None,
    adapter_name: str | None = None,
    progress: bool | ProgressCallback = True,
    config: EvalConfig | None = None,
) -> str:
    """Run :func:`run_evaluation` and return the evaluation run id."""
    return run_evaluation(vlm, store, dataset, split, limit, adapter_name, progress, config)["eval_run_id"]


def _write_predictions(store: Store, run_id: str, model: str, adapter: str | None, rows: list[dict], texts: list[str]) -> None:
    records = []
    for row, text in zip(rows, texts):
        scores = score_answer(text, row["answer"], row["answer_type"])
        records.append([run_id, row["id"], model, adapter, text, scores["paper"], scores["strict"]])
    with store.transaction() as cur:
        cur.executemany(
            "INSERT INTO predictions (eval_run_id, sample_id, model, adapter, text, score_paper, score_strict) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            records,
        )


def run_predictions(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Return a run's predictions joined with their samples, in the samples' order."""
    return store.query(
        "SELECT p.sample_id, p.text, p.score_paper, p.score_strict, s.question, s.answer, s.answer_type, "
        "s.source_id, s.dataset, s.split FROM predictions p JOIN samples s ON s.id = p.sample_id "
        "WHERE p.eval_run_id = ? ORDER BY s.dataset, s.split, s.created_at, s.id",
        [run_id],
    )


def run_metrics(store: Store, run_id: str) -> dict[str, Any]:
    """Summarize a run's stored per-sample scores (see :func:`hscr.metrics.summarize`)."""
    rows = run_predictions(store, run_id)
    return summarize(
        {"answer_type": r["answer_type"], "paper": r["score_paper"], "strict": r["score_strict"]} for r in rows
    )


def _finish_run(store: Store, run_id: str, errors: list[str]) -> dict[str, Any]:
    metrics = run_metrics(store, run_id)
    stored = {**metrics, "errors": len(errors)}
    store.execute("UPDATE eval_runs SET metrics_json = ? WHERE id = ?", [json.dumps(stored), run_id])
    return metrics


def write_answer_files(store: Store, run_id: str, answers_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write a run's answers (LLaVA-Med JSONL) and the matching references JSONL beside them.

    Answers: ``{question_id, prompt, text, answer_id, model_id, metadata}``. References:
    ``{question_id, question, answer, answer_type}`` with LLaVA-Med's ``OPEN``/``CLOSED``.
    The default place is ``<data>/runs/<run id>/answers.jsonl``; the references go to
    ``<answers stem>.references.jsonl`` in the same folder.
    """
    run = _run_row(store, run_id)
    rows = run_predictions(store, run_id)
    answers = Path(answers_path) if answers_path else store.data_dir / "runs" / run_id / "answers.jsonl"
    references = answers.with_name(answers.stem + ".references.jsonl")
    ids = _question_ids(rows)
    answer_records = [
        {
            "question_id": ids[r["sample_id"]],
            "prompt": r["question"],
            "text": r["text"],
            "answer_id": hashlib.sha256(f"{run_id}\x1f{r['sample_id']}".encode()).hexdigest()[:22],
            "model_id": run["model"],
            "metadata": {"sample_id": r["sample_id"], "adapter": run["adapter"], "eval_run_id": run_id},
        }
        for r in rows
    ]
    reference_records = [
        {"question_id": ids[r["sample_id"]], "question": r["question"], "answer": r["answer"],
         "answer_type": r["answer_type"].upper()}
        for r in rows
    ]
    return write_jsonl(answers, answer_records), write_jsonl(references, reference_records)


# -- reading results ---------------------------------------------------------------------------


def _run_row(store: Store, run_id: str) -> dict[str, Any]:
    rows = store.query("SELECT * FROM eval_runs WHERE id = ?", [run_id])
    if not rows:
        raise HSCRError(f"evaluation run {run_id!r} not found in {store.db_path}")
    return rows[0]


def list_eval_runs(store: Store, dataset: str | None = None) -> list[dict[str, Any]]:
    """Return evaluation runs, newest first, with their stored metrics decoded."""
    sql = "SELECT * FROM eval_runs" + (" WHERE dataset = ?" if dataset else "") + " ORDER BY created_at DESC, id"
    runs = store.query(sql, [dataset] if dataset else [])
    for run in runs:
        run["metrics"] = json.loads(run.pop("metrics_json") or "null")
    return runs


def metrics_table(store: Store, eval_run_ids: list[str]) -> list[dict[str, Any]]:
    """Return one flat row per run: model, adapter, dataset and both protocols' percentages."""
    table = []
    for run_id in eval_run_ids:
        run = _run_row(store, run_id)
        metrics = run_metrics(store, run_id)
        table.append(
            {
                "eval_run_id": run_id,
                "model": run["model"],
                "adapter": run["adapter"],
                "dataset": run["dataset"],
                "split": run["split"],
                "paper_open_recall": metrics["paper"]["open_recall"],
                "paper_closed_accuracy": metrics["paper"]["closed_accuracy"],
                "strict_open_recall": metrics["strict"]["open_recall"],
                "strict_closed_accuracy": metrics["strict"]["closed_accuracy"],
                "open_count": metrics["counts"]["open"],
                "closed_count": metrics["counts"]["closed"],
            }
        )
    return table


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`metrics_table` rows as an aligned text table."""
    header = ["dataset", "split", "model", "adapter", "open (paper)", "closed (paper)", "open (strict)",
              "closed (strict)", "n open", "n closed"]
    keys = ["dataset", "split", "model", "adapter", "paper_open_recall", "paper_closed_accuracy",
            "strict_open_recall", "strict_closed_accuracy", "open_count", "closed_count"]
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [header] + [[cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)
