"""PathVQA importer: original pickles (restricted unpickling) and the Parquet copy."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from fixtures_datasets import run_import, write_pathvqa, write_pathvqa_parquet, write_pickle
from hscr.datasets.pathvqa import load_plain_pickle
from hscr.errors import DataError
from hscr.store import Store


def test_original_layout(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("pathvqa", str(write_pathvqa(tmp_path)), "--db", str(db))
    assert code == 1
    assert report["layout"] == "original"
    assert report["imported"] == {"train": 3, "validation": 1, "test": 1}
    assert report["errors"] == [
        f"test_qa.pkl record 1: image file test_0005.jpg not found in {tmp_path / 'pvqa' / 'images' / 'test'}; row skipped"
    ]
    assert report["warnings"] == [
        "1 image(s) of the test split also occur in the train split, so a model trained on train has seen them: test_0000.jpg"
    ]
    with Store(db) as store:
        samples = {row["question"]: row for row in store.samples()}
    described = samples["What does this image show?"]
    assert described["source_id"] == "101"
    assert described["answer_type"] == "open"
    assert samples["Is this tissue necrotic?"]["answer_type"] == "closed"
    # No vqa pickle entry: closed is inferred from the yes/no answer.
    assert samples["Are the cells stained?"]["answer_type"] == "closed"
    assert samples["Are the cells stained?"]["source_id"] is None


def test_cmyk_stored_as_rgb(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    run_import("pathvqa", str(write_pathvqa(tmp_path)), "--db", str(db))
    with Store(db) as store:
        row = next(r for r in store.samples() if r["question"] == "Are the cells stained?")
    with Image.open(db.parent / row["image_path"]) as stored:
        assert stored.mode == "RGB"


def test_parent_folder_detected(tmp_path: Path):
    write_pathvqa(tmp_path)
    _, report, _, _ = run_import("pathvqa", str(tmp_path), "--db", str(tmp_path / "db.duckdb"))
    assert report["imported"] == {"train": 3, "validation": 1, "test": 1}


def test_parquet_layout(tmp_path: Path):
    db = tmp_path / "db.duckdb"
    code, report, _, _ = run_import("pathvqa", str(write_pathvqa_parquet(tmp_path)), "--db", str(db))
    assert code == 0
    assert report["imported"] == {"train": 2, "validation": 1, "test": 1}
    with Store(db) as store:
        types = {row["question"]: row["answer_type"] for row in store.samples()}
    assert types["is this an inflammatory lesion?"] == "closed"
    assert types["what stain was used?"] == "open"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_code_rejected(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([_RunsCode()]))
    with pytest.raises(DataError, match=r"cannot be loaded safely: refusing to load (posix|os)\.system"):
        load_plain_pickle(path)
    assert not (tmp_path / "pwned").exists()


def test_bad_pickle_in_layout_is_clean_error(tmp_path: Path):
    folder = write_pathvqa(tmp_path)
    write_pickle(folder / "qas" / "val" / "val_qa.pkl", {"not": "a list"})
    code, report, _, err = run_import("pathvqa", str(folder), "--db", str(tmp_path / "db.duckdb"))
    assert code == 2
    assert report["errors"] == [f"{folder / 'qas' / 'val' / 'val_qa.pkl'} must hold a list of question records, found dict"]
    assert "Traceback" not in err
