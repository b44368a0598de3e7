"""The import command: format detection, exit codes, JSON report and bad input in folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fixtures_datasets import run_import, write_slake, write_vqa_rad_mevf, write_vqa_rad_osf
from hscr.datasets.common import clean_answer, infer_answer_type, normalize_split
from hscr.store import Store

REPO = Path(__file__).resolve().parent.parent


def test_wrong_format_names_the_right_one(tmp_path: Path):
    folder = write_vqa_rad_osf(tmp_path)
    code, report, _, err = run_import("slake", str(folder), "--db", str(tmp_path / "db.duckdb"))
    assert code == 2
    assert report["imported"] == {}
    assert len(report["errors"]) == 1
    message = report["errors"][0]
    assert message.startswith(f"{folder} is not a slake dataset: expected train.json")
    assert f"It looks like vqa-rad: run `python -m hscr import vqa-rad {folder}`" in message
    assert err.strip() == f"error: {message}"


def test_slake_folder_is_not_vqa_rad(tmp_path: Path):
    folder = write_slake(tmp_path)
    code, report, _, _ = run_import("vqa-rad", str(folder), "--db", str(tmp_path / "db.duckdb"))
    assert code == 2
    assert "It looks like slake" in report["errors"][0]


def test_unknown_format_and_missing_path(tmp_path: Path):
    code, report, _, _ = run_import("mimic", str(tmp_path), "--db", str(tmp_path / "db.duckdb"))
    assert code == 2
    assert report["errors"] == ["unknown dataset format 'mimic'; supported: vqa-rad, slake, pathvqa, llava-med, folder"]
    code, report, _, _ = run_import("slake", str(tmp_path / "absent"), "--db", str(tmp_path / "db.duckdb"))
    assert code == 2
    assert report["errors"] == [f"slake dataset path not found: {tmp_path / 'absent'}"]


def test_invalid_json_no_traceback(tmp_path: Path):
    folder = write_vqa_rad_mevf(tmp_path)
    (folder / "testset.json").write_text('[{"qid": 1,', encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "hscr", "import", "vqa-rad", str(folder), "--db", str(tmp_path / "db.duckdb")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {folder / 'testset.json'} is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 12"
    ]


def test_folder_bad_rows_reported_rest_imported(tmp_path: Path):
    folder = tmp_path / "cases"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "good.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "samples.csv").write_text(
        "image,question,answer,answer_type\n"
        "good.png,Is it dark?,Yes.,\n"
        "notes.png,Is it bright?,no,\n"
        "missing.png,What is it?,a void,\n"
        "../outside.png,What is outside?,nothing,\n"
        "good.png,What colour?,,\n"
        "good.png,What colour is it?,black,OPEN\n"
        "good.png,is it  dark?,yes,\n",
        encoding="utf-8",
    )

    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("folder", str(folder), "--db", str(db))
    assert code == 1
    assert report["imported"] == {"train": 2}
    assert report["duplicates"] == 1
    assert report["skipped"] == 4
    assert report["errors"] == [
        f"samples.csv line 3: {folder / 'notes.png'} is not a readable image (PNG, JPEG, TIFF, BMP or DICOM expected); row skipped",
        f"samples.csv line 4: image file 'missing.png' not found in {folder}; row skipped",
        f"samples.csv line 5: image path '../outside.png' points outside {folder}; row skipped",
        "samples.csv line 6: empty answer; row skipped",
    ]

    with Store(db) as store:
        rows = {row["question"]: row for row in store.samples()}
        image_count = store.query("SELECT count(*) AS n FROM images")[0]["n"]
    assert rows["Is it dark?"]["answer"] == "yes"
    assert rows["Is it dark?"]["answer_type"] == "closed"
    assert rows["What colour is it?"]["answer_type"] == "open"
    assert image_count == 1


def test_json_is_last_line(tmp_path: Path):
    _, _, stdout, _ = run_import("vqa-rad", str(write_vqa_rad_mevf(tmp_path)), "--db", str(tmp_path / "db.duckdb"))
    last = json.loads(stdout.strip().splitlines()[-1])
    assert set(last) >= {"imported", "duplicates", "skipped", "warnings", "errors"}
    assert stdout.strip().splitlines()[0].startswith("imported 5 samples into 'vqa-rad' (train: 3, test: 2)")


def test_name_option(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("vqa-rad", str(write_vqa_rad_mevf(tmp_path)), "--db", str(db), "--name", "rad-mevf")
    with Store(db) as store:
        assert {row["dataset"] for row in store.samples()} == {"rad-mevf"}


def test_language_filter_leaves_nothing(tmp_path: Path):
    _, report, _, _ = run_import("vqa-rad", str(write_vqa_rad_mevf(tmp_path)), "--db", str(tmp_path / "db.duckdb"), "--lang", "zh")
    assert report["imported"] == {}
    assert report["filtered"] == 5
    assert report["warnings"][-1] == "all 5 rows are in other languages than zh (found: en); use --lang all"


def test_conflicting_duplicate_warns(tmp_path: Path):
    folder = tmp_path / "cases"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "a.png")
    (folder / "samples.csv").write_text(
        "image,question,answer\na.png,Which side?,left\na.png,Which  side?,right\n", encoding="utf-8"
    )
    code, report, _, _ = run_import("folder", str(folder), "--db", str(tmp_path / "db.duckdb"))
    assert code == 0
    assert report["imported"] == {"train": 1}
    assert report["duplicates"] == 1
    assert report["warnings"] == [
        "samples.csv line 3: same image and question as samples.csv line 2 but answer 'right' instead of 'left'; kept the first"
    ]


class TestCleaning:
    def test_chinese_yes_no_inferred_closed(self):
        for answer in ("是的", "不是", "包含", "不包含", "有", "没有", "可以", "不可以"):
            assert infer_answer_type(answer) == "closed", answer
        assert infer_answer_type("肝脏") == "open"

    def test_given_type_wins(self):
        assert infer_answer_type("Left", "CLOSED ") == "closed"
        assert infer_answer_type("yes", "other") == "open"
        assert infer_answer_type("no", "yes/no") == "closed"

    def test_clean_answer(self):
        assert clean_answer(" Yes. ") == "yes"
        assert clean_answer(4) == "4"
        assert clean_answer(2.0) == "2"
        assert clean_answer("Liver, Spleen") == "Liver, Spleen"
        assert clean_answer("left\tlung.") == "left lung"
        assert clean_answer("This answer is a whole sentence of words.") == "This answer is a whole sentence of words."

    def test_split_names(self):
        assert [normalize_split(name) for name in ("validate", "val", "Validation", "train", "test")] == [
            "validation", "validation", "validation", "train", "test",
        ]


def test_invalid_unicode_costs_one_row(tmp_path: Path):
    folder = write_vqa_rad_mevf(tmp_path)
    text = (folder / "trainset.json").read_text(encoding="utf-8")
    # A lone surrogate escape is valid JSON but cannot be stored as UTF-8: once in a question
    # (caught while cleaning) and once in a meta field (caught by the database write).
    text = text.replace('"Is there an effusion?"', '"Is there an \\ud800 effusion?"')
    text = text.replace('"image_organ": "HEAD"', '"image_organ": "HE\\udc00AD"')
    (folder / "trainset.json").write_text(text, encoding="utf-8")
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("vqa-rad", str(folder), "--db", str(db))
    assert code == 1
    assert report["imported"] == {"train": 1, "test": 2}
    assert report["skipped"] == 2
    assert report["errors"][0] == (
        "trainset.json record 0 (qid 11): the question is not valid Unicode (surrogates not allowed at character 12); row skipped"
    )
    assert report["errors"][1].startswith("trainset.json record 2 (qid 13): writing the row failed (")
    with Store(db) as store:
        assert sorted(row["source_id"] for row in store.samples()) == ["12", "21", "22"]


def test_samples_keep_file_order(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("vqa-rad", str(write_vqa_rad_mevf(tmp_path)), "--db", str(db))
    with Store(db) as store:
        assert [row["source_id"] for row in store.samples(split="train")] == ["11", "12", "13"]
        assert [row["source_id"] for row in store.samples(split="test")] == ["21", "22"]
