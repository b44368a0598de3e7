"""VQA-RAD importer: OSF release, MEVF split and Hugging Face Parquet, with their quirks."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_datasets import run_import, write_vqa_rad_mevf, write_vqa_rad_osf, write_vqa_rad_parquet
from hscr.store import Store


def _samples(db: Path) -> dict[str, dict]:
    with Store(db) as store:
        return {row["source_id"]: row for row in store.samples()}


class TestOsf:
    def test_counts_and_report(self, tmp_path: Path):
        db = tmp_path / "db.duckdb"
        code, report, _, err = run_import("vqa-rad", str(write_vqa_rad_osf(tmp_path)), "--db", str(db))
        assert code == 1
        assert report["imported"] == {"train": 4, "test": 2}
        assert report["duplicates"] == 1
        assert report["skipped"] == 1
        assert report["errors"] == [
            f"VQA_RAD Dataset Public.json record 4 (qid 5): image file 'synpic9.jpg' not found in "
            f"{tmp_path / 'vqa-rad-osf' / 'VQA_RAD Image Folder'}; row skipped"
        ]
        assert "error: VQA_RAD Dataset Public.json record 4 (qid 5)" in err
        assert "Traceback" not in err

    def test_leak_warnings_list_images(self, tmp_path: Path):
        _, report, _, _ = run_import("vqa-rad", str(write_vqa_rad_osf(tmp_path)), "--db", str(tmp_path / "db.duckdb"))
        image_warning = next(w for w in report["warnings"] if "image(s) of the test split" in w)
        assert image_warning.startswith("2 image(s) of the test split also occur in the train split")
        assert image_warning.endswith("synpic1.jpg, synpic2.jpg")
        assert "1 (image, question) pair(s) of the test split also occur in the train split" in report["warnings"]

    def test_quirks_cleaned(self, tmp_path: Path):
        db = tmp_path / "db.duckdb"
        run_import("vqa-rad", str(write_vqa_rad_osf(tmp_path)), "--db", str(db))
        samples = _samples(db)
        assert set(samples) == {"1", "3", "4", "6", "7", "8"}
        # "CLOSED " with a trailing space, "Yes" capitalised, a tab in the question.
        assert samples["1"]["answer_type"] == "closed"
        assert samples["1"]["answer"] == "yes"
        assert samples["1"]["question"] == "Is there a fracture?"
        # An integer answer becomes its digits.
        assert samples["3"]["answer"] == "4"
        assert json.loads(samples["3"]["meta_json"])["answer_raw"] == 4
        # Leading space and trailing period.
        assert samples["4"]["answer"] == "no"
        assert json.loads(samples["4"]["meta_json"])["answer_raw"] == " no."
        assert samples["4"]["split"] == "test"
        # A closed answer that is not yes/no keeps its type and case.
        assert samples["6"]["answer"] == "Left"
        assert samples["6"]["answer_type"] == "closed"
        # Multi-part answers stay as written.
        assert samples["8"]["answer"] == "liver, spleen"
        meta = json.loads(samples["8"]["meta_json"])
        assert meta["image_organ"] == "ABD"
        assert meta["phrase_type"] == "para"
        assert meta["image_name"] == "synpic3.jpg"

    def test_reimport_adds_nothing(self, tmp_path: Path):
        folder = write_vqa_rad_osf(tmp_path)
        db = tmp_path / "db.duckdb"
        run_import("vqa-rad", str(folder), "--db", str(db))
        before = _samples(db)
        _, report, _, _ = run_import("vqa-rad", str(folder), "--db", str(db))
        assert report["imported"] == {}
        assert report["duplicates"] == 7
        assert _samples(db).keys() == before.keys()
        with Store(db) as store:
            assert store.query("SELECT count(*) AS n FROM images")[0]["n"] == 3


def test_mevf_split_from_file_names(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("vqa-rad", str(write_vqa_rad_mevf(tmp_path)), "--db", str(db))
    assert code == 0
    assert report["layout"] == "mevf"
    assert report["imported"] == {"train": 3, "test": 2}
    samples = _samples(db)
    assert samples["21"]["split"] == "test"
    assert samples["11"]["answer_type"] == "closed"
    assert samples["12"]["answer"] == "right"
    assert samples["13"]["answer"] == "2"
    assert samples["13"]["question"] == "How many ventricles are dilated?"
    assert any(w.endswith("imgA.jpg, imgB.jpg") for w in report["warnings"])


def test_parquet_infers_closed(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    folder = write_vqa_rad_parquet(tmp_path)
    code, report, _, _ = run_import("vqa-rad", str(folder), "--db", str(db))
    assert code == 0
    assert report["layout"] == "parquet"
    assert report["imported"] == {"train": 2, "test": 2}
    assert report["duplicates"] == 1
    with Store(db) as store:
        types = {row["question"]: row["answer_type"] for row in store.samples()}
    assert types == {
        "is there a pneumothorax?": "closed",
        "what modality is this?": "open",
        "is the mediastinum shifted?": "closed",
        "where is the mass?": "open",
    }
    _, again, _, _ = run_import("vqa-rad", str(folder), "--db", str(db))
    assert again["imported"] == {}
    assert again["duplicates"] == 5


def test_single_json_file_path(tmp_path: Path):
    folder = write_vqa_rad_mevf(tmp_path)
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("vqa-rad", str(folder / "testset.json"), "--db", str(db))
    assert code == 0
    # MEVF's phrase_type has no "test_" prefix, so the split comes from the file name.
    assert report["imported"] == {"test": 2}
