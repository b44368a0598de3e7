"""LLaVA-Med importer: instruction data, ground truth with ``conversatons``, question files."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_datasets import run_import, write_llava_med
from hscr.store import Store


def _samples(db: Path) -> dict[str, dict]:
    with Store(db) as store:
        return {row["source_id"]: row for row in store.samples()}


def test_folder_of_files(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("llava-med", str(write_llava_med(tmp_path)), "--db", str(db))
    assert code == 0
    assert report["layout"] == "eval,instruct,questions"
    # Train has the three instruction turn pairs. Test has q1 and q2 from the ground truth and q9
    # from the question file. The question file's q1 repeats the ground-truth q1, so it is merged.
    assert report["imported"] == {"train": 3, "test": 3}
    assert report["duplicates"] == 1
    assert "answers.jsonl is a model answer file, not ground truth; skipped" in report["warnings"]
    assert any(w.startswith("questions.jsonl: 1 question(s) have no ground-truth answer") for w in report["warnings"])


def test_turns_and_image_token(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("llava-med", str(write_llava_med(tmp_path)), "--db", str(db))
    samples = _samples(db)
    assert samples["PMC1_F1#0"]["question"] == "What does the chest X-ray show?"
    assert samples["PMC1_F1#1"]["question"] == "Is the heart enlarged?"
    assert json.loads(samples["PMC1_F1#1"]["meta_json"])["turn"] == 1
    # <image> after the question text is removed too.
    assert samples["PMC2_F3"]["question"] == "What type of tissue is seen here?"
    assert samples["PMC2_F3"]["split"] == "train"
    assert json.loads(samples["PMC2_F3"]["meta_json"])["domain"] == ["histology"]
    # Sentence answers keep their final period; short answers lose it.
    assert samples["PMC1_F1#0"]["answer"] == "The chest X-ray shows a right-sided pleural effusion."
    assert samples["PMC2_F3"]["answer"] == "Glandular tissue with atypical cells"


def test_misspelled_conversations_key(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("llava-med", str(write_llava_med(tmp_path)), "--db", str(db))
    samples = _samples(db)
    assert samples["q1"]["question"] == "Is there a mass?"
    assert samples["q1"]["answer"] == "yes"
    assert samples["q1"]["answer_type"] == "closed"
    assert samples["q2"]["answer_type"] == "open"
    assert samples["q9"]["answer"] == ""
    assert json.loads(samples["q9"]["meta_json"])["has_answer"] is False


def test_single_file_with_image_folder(tmp_path: Path):
    folder = write_llava_med(tmp_path)
    images = tmp_path / "elsewhere"
    (folder / "images").rename(images)
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import(
        "llava-med", str(folder / "llava_med_instruct_fixture.json"), "--db", str(db), "--images", str(images)
    )
    assert code == 0
    assert report["layout"] == "instruct"
    assert report["imported"] == {"train": 3}


def test_missing_images_reported_per_row(tmp_path: Path):
    folder = write_llava_med(tmp_path)
    (folder / "images" / "synpic100.jpg").unlink()
    code, report, _, _ = run_import("llava-med", str(folder / "vqa_gt_fixture.json"), "--db", str(tmp_path / "db.duckdb"))
    assert code == 1
    assert report["imported"] == {}
    assert [e.split(":")[0] for e in report["errors"]] == [
        "vqa_gt_fixture.json record 0 (id q1)", "vqa_gt_fixture.json record 1 (id q2)",
    ]
