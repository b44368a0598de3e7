"""Evaluation runs on a real DuckDB file: stored predictions, metrics, answer files, resume, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import save_tiny_model, tiny_vlm, write_image_folder

from hscr.config import EvalConfig
from hscr.datasets.common import ImportOptions
from hscr.datasets.folder import import_path
from hscr.decoding import greedy_generate
from hscr.errors import DataError, ModelLoadError
from hscr.evaluate import (
    evaluate_dataset,
    list_eval_runs,
    load_adapter,
    metrics_table,
    run_evaluation,
    run_predictions,
    score_files,
)
from hscr.images import open_stored
from hscr.metrics import score_answer
from hscr.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHORT = EvalConfig(batch_size=8, max_new_tokens=8)

ROWS = [
    {"image": "a.png", "question": "is there a lesion in the left lung ?", "answer": "yes", "split": "test"},
    {"image": "a.png", "question": "what modality is this image ?", "answer": "x-ray", "split": "test"},
    {"image": "b.png", "question": "how many lesions are visible ?", "answer": "two", "split": "test"},
    {"image": "b.png", "question": "is the heart enlarged ?", "answer": "no", "split": "test"},
    {"image": "c.png", "question": "which organ is shown ?", "answer": "chest", "split": "test"},
    {"image": "c.png", "question": "is there a mass ?", "answer": "no", "split": "train"},
]


@pytest.fixture
def store(tmp_path):
    folder = write_image_folder(tmp_path / "source", ROWS)
    db = Store(tmp_path / "data" / "hscr.duckdb")
    report = import_path(db, folder, ImportOptions(name="phantoms"))
    assert report.ok, report.errors
    yield db
    db.close()


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hscr", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def test_predictions_stored_and_scored(store, vlm):
    run_id = evaluate_dataset(vlm, store, "phantoms", "test", adapter_name=None, progress=False, config=SHORT)
    rows = run_predictions(store, run_id)
    samples = store.samples("phantoms", "test")
    assert [r["sample_id"] for r in rows] == [s["id"] for s in samples]

    images = [open_stored(store.data_dir / s["image_path"]) for s in samples]
    expected = greedy_generate(vlm, images, [s["question"] for s in samples], max_new_tokens=8)
    assert [r["text"] for r in rows] == expected
    for row in rows:
        scores = score_answer(row["text"], row["answer"], row["answer_type"])
        assert row["score_paper"] == scores["paper"]
        assert row["score_strict"] == scores["strict"]

    stored = store.query("SELECT model, adapter FROM predictions WHERE eval_run_id = ?", [run_id])
    assert {(r["model"], r["adapter"]) for r in stored} == {("tiny", None)}


def test_metrics_table_matches_answer_files(store, vlm):
    summary = run_evaluation(vlm, store, "phantoms", "test", progress=False, config=SHORT)
    table = metrics_table(store, [summary["eval_run_id"]])
    assert len(table) == 1
    row = table[0]
    assert (row["dataset"], row["split"], row["model"], row["adapter"]) == ("phantoms", "test", "tiny", None)
    assert (row["open_count"], row["closed_count"]) == (3, 2)

    rescored = score_files(summary["answers"], summary["references"]).summary
    assert rescored == summary["metrics"]
    assert row["paper_open_recall"] == rescored["paper"]["open_recall"]
    assert row["paper_closed_accuracy"] == rescored["paper"]["closed_accuracy"]
    assert row["strict_open_recall"] == rescored["strict"]["open_recall"]
    assert row["strict_closed_accuracy"] == rescored["strict"]["closed_accuracy"]

    answers = [json.loads(line) for line in Path(summary["answers"]).read_text().splitlines()]
    assert sorted(answers[0]) == ["answer_id", "metadata", "model_id", "prompt", "question_id", "text"]
    assert answers[0]["model_id"] == "tiny"
    runs = list_eval_runs(store, "phantoms")
    assert runs[0]["metrics"]["counts"] == {"open": 3, "closed": 2}


def test_metrics_from_known_predictions(store):
    # Metrics come from the stored rows, so fixed predictions give exact percentages.
    samples = store.samples("phantoms", "test")
    texts = ["Yes.", "an x-ray of the chest", "2", "normal", "brain"]
    store.execute("INSERT INTO eval_runs (id, model, dataset, split) VALUES ('fixed', 'm', 'phantoms', 'test')")
    for sample, text in zip(samples, texts):
        scores = score_answer(text, sample["answer"], sample["answer_type"])
        store.execute(
            "INSERT INTO predictions (eval_run_id, sample_id, model, text, score_paper, score_strict) "
            "VALUES ('fixed', ?, 'm', ?, ?, ?)",
            [sample["id"], text, scores["paper"], scores["strict"]],
        )
    row = metrics_table(store, ["fixed"])[0]
    # open: x-ray 1.0, two 1.0, chest 0.0; closed: yes 1/1, no vs "normal" 1/0
    assert row["paper_open_recall"] == 66.67
    assert row["strict_open_recall"] == 66.67
    assert row["paper_closed_accuracy"] == 100.0
    assert row["strict_closed_accuracy"] == 50.0


def test_rerun_resumes_after_interrupt(store, vlm):
    def stop_after_first_batch(done, total):
        raise KeyboardInterrupt

    config = EvalConfig(batch_size=2, max_new_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(vlm, store, "phantoms", "test", progress=stop_after_first_batch, config=config)
    partial = store.query("SELECT count(*) AS n FROM predictions")[0]["n"]
    assert partial == 2

    summary = run_evaluation(vlm, store, "phantoms", "test", progress=False, config=config)
    assert summary["skipped"] == 2
    assert summary["processed"] == 3
    again = run_evaluation(vlm, store, "phantoms", "test", progress=False, config=config)
    assert again["eval_run_id"] == summary["eval_run_id"]
    assert (again["processed"], again["skipped"]) == (0, 5)
    assert again["metrics"] == summary["metrics"]


def test_unreadable_image_is_reported(store, vlm):
    broken = store.samples("phantoms", "test")[2]
    (store.data_dir / broken["image_path"]).write_bytes(b"not a png")
    summary = run_evaluation(vlm, store, "phantoms", "test", progress=False, config=SHORT)
    assert summary["processed"] == 3     # the two questions on the broken image are skipped
    assert len(summary["errors"]) == 2
    assert broken["id"] in summary["errors"][0]


def test_unknown_dataset_and_split(store, vlm):
    with pytest.raises(DataError, match="dataset 'nope' not found .* known datasets: phantoms"):
        evaluate_dataset(vlm, store, "nope", "test", progress=False)
    with pytest.raises(DataError, match="has no split 'val' .* its splits: test, train"):
        evaluate_dataset(vlm, store, "phantoms", "val", progress=False)


def test_missing_adapter_folder(tmp_path, vlm):
    with pytest.raises(ModelLoadError, match="has no adapter_config.json"):
        load_adapter(vlm, tmp_path)


@pytest.mark.slow
def test_evaluate_cli_with_and_without_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model_dir = save_tiny_model(tmp_path / "model")
    folder = write_image_folder(tmp_path / "source", ROWS)
    db_path = tmp_path / "data" / "hscr.duckdb"
    with Store(db_path) as db:
        import_path(db, folder, ImportOptions(name="phantoms"))

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(model_dir)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")

    common = ["evaluate", "--model", str(model_dir), "--db", str(db_path), "--dataset", "phantoms", "--json",
              "--set", "max_new_tokens=6"]
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    plain_summary = json.loads(plain.stdout.strip().splitlines()[-1])
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "status.json").write_text("{}")
    adapted = run_cli(*common, "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out" / "answers.jsonl"),
                      env={**os.environ, "HSCR_JOB_DIR": str(job_dir)})
    assert adapted.returncode == 0, adapted.stderr
    adapted_summary = json.loads(adapted.stdout.strip().splitlines()[-1])

    assert plain_summary["processed"] == 5
    assert adapted_summary["answers"] == str(tmp_path / "out" / "answers.jsonl")
    assert Path(adapted_summary["references"]).is_file()
    assert plain_summary["eval_run_id"] != adapted_summary["eval_run_id"]
    assert "evaluate" in adapted.stderr          # tqdm progress goes to stderr
    progress = json.loads((job_dir / "status.json").read_text())["progress"]
    assert (progress["fraction"], progress["step"], progress["total"]) == (1.0, 5, 5)

    with Store(db_path) as db:
        plain_rows = db.query("SELECT sample_id, text, adapter FROM predictions WHERE eval_run_id = ? ORDER BY sample_id",
                              [plain_summary["eval_run_id"]])
        adapted_rows = db.query("SELECT sample_id, text, adapter FROM predictions WHERE eval_run_id = ? ORDER BY sample_id",
                                [adapted_summary["eval_run_id"]])
        table = metrics_table(db, [plain_summary["eval_run_id"], adapted_summary["eval_run_id"]])
    assert {r["adapter"] for r in plain_rows} == {None}
    assert {r["adapter"] for r in adapted_rows} == {str(tmp_path / "adapter")}
    assert [r["text"] for r in plain_rows] != [r["text"] for r in adapted_rows]
    assert [r["adapter"] for r in table] == [None, str(tmp_path / "adapter")]


def test_evaluate_cli_bad_adapter(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    result = run_cli("evaluate", "--model", str(model_dir), "--db", str(tmp_path / "db.duckdb"), "--dataset", "x",
                     "--adapter", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "has no adapter_config.json" in result.stderr
