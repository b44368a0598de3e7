"""SLAKE importer: both layouts, language selection, Chinese answers and cross-language leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_datasets import run_import, write_slake
from hscr.store import Store


def _samples(db: Path) -> dict[str, dict]:
    with Store(db) as store:
        return {row["source_id"]: row for row in store.samples()}


@pytest.mark.parametrize("huggingface,layout", [(False, "original"), (True, "huggingface+imgs.zip")])
def test_english_default(tmp_path: Path, huggingface: bool, layout: str):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("slake", str(write_slake(tmp_path, huggingface)), "--db", str(db))
    assert code == 0
    assert report["layout"] == layout
    assert report["imported"] == {"train": 3, "validation": 1, "test": 2}
    assert report["filtered"] == 3
    samples = _samples(db)
    assert {row["lang"] for row in samples.values()} == {"en"}
    assert samples["1"]["answer"] == "yes"
    assert samples["2"]["answer"] == "Liver, Spleen, Kidney"
    assert samples["3"]["answer"] == "None"
    assert samples["6"]["answer_type"] == "closed"
    assert samples["6"]["split"] == "validation"
    meta = json.loads(samples["2"]["meta_json"])
    assert meta["triple"] == ["vhead", "_", "_"]
    assert meta["base_type"] == "vqa"


def test_leak_from_chinese_train_reported_for_english(tmp_path: Path):
    _, report, _, _ = run_import("slake", str(write_slake(tmp_path)), "--db", str(tmp_path / "db.duckdb"))
    assert report["warnings"] == [
        "1 image(s) of the test split also occur in the train split of any language, "
        "so a model trained on train has seen them: xmlab2/source.jpg"
    ]


def test_all_languages(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("slake", str(write_slake(tmp_path)), "--db", str(db), "--lang", "all")
    assert code == 0
    assert report["imported"] == {"train": 5, "validation": 1, "test": 3}
    assert report["filtered"] == 0
    samples = _samples(db)
    assert samples["4"]["lang"] == "zh"
    assert samples["4"]["answer"] == "是的"
    assert samples["4"]["answer_type"] == "closed"
    assert samples["5"]["answer"] == "不包含"
    assert samples["9"]["answer"] == "有"


def test_chinese_only(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    _, report, _, _ = run_import("slake", str(write_slake(tmp_path)), "--db", str(db), "--lang", "zh")
    assert report["imported"] == {"train": 2, "test": 1}
    assert report["filtered"] == 6


def test_image_modality_recorded(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("slake", str(write_slake(tmp_path)), "--db", str(db))
    with Store(db) as store:
        modalities = {row["source_id"]: row["modality"] for row in store.samples()}
    assert modalities["1"] == "CT"
    assert modalities["3"] == "X-Ray"


def test_missing_image_in_zip(tmp_path: Path):
    folder = write_slake(tmp_path, huggingface=True)
    records = json.loads((folder / "test.json").read_text(encoding="utf-8"))
    records[0]["img_name"] = "xmlab77/source.jpg"
    (folder / "test.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    code, report, _, _ = run_import("slake", str(folder), "--db", str(tmp_path / "db.duckdb"))
    assert code == 1
    assert report["imported"] == {"train": 3, "validation": 1, "test": 1}
    assert len(report["errors"]) == 1
    assert report["errors"][0].startswith("test.json record 0 (qid 7): image 'xmlab77/source.jpg' not found in")

