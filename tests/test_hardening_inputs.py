"""The bad-input corpus through the command line: a clear error or a correct import, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bad_inputs
from hardening_support import consistency_problems
from hscr.__main__ import main as hscr_main
from hscr.store import Store

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "hscr", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_corpus_has_enough_cases():
    names = [case.name for case in bad_inputs.ALL_CASES] + bad_inputs.MODEL_CASES
    assert len(names) >= 25
    assert len(set(names)) == len(names)


def test_image_corpus_through_cli(tmp_path):
    corpus, by_line = bad_inputs.write_image_corpus(tmp_path / "corpus")
    db = tmp_path / "data" / "hscr.duckdb"

    result = run_cli("import", "folder", str(corpus), "--db", str(db), "--json")

    assert result.returncode == 1, result.stderr          # some rows failed, the rest was imported
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = {message.split(":")[0]: message for message in report["errors"]}
    for line, case in by_line.items():
        if case.expect == "error":
            assert line in errors, f"{case.name}: no error reported"
            assert case.match in errors[line].lower(), f"{case.name}: {errors[line]}"
            assert f"error: {line}:" in result.stderr
        else:
            assert line not in errors, f"{case.name}: {errors.get(line)}"
    expected_imports = 1 + sum(case.expect == "import" for case in by_line.values())
    assert report["imported"] == {"train": expected_imports}
    assert report["skipped"] == len(errors)
    assert consistency_problems(db) == []
    with Store(db, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM samples")[0]["n"] == expected_imports
        formats = {row["source_format"] for row in store.query("SELECT source_format FROM images")}
    assert {"png", "jpeg"} <= formats


@pytest.mark.parametrize("case", bad_inputs.DATASET_CASES, ids=lambda case: case.name)
def test_dataset_case_through_cli(tmp_path, capsys, case):
    path = case.build(tmp_path / "dataset")
    db = tmp_path / "data" / "hscr.duckdb"

    code = hscr_main(["import", case.kind, str(path), "--db", str(db), "--no-progress"])

    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if case.expect == "import":
        assert code == 0, err
        assert "0 errors" in out
    else:
        assert code in (1, 2)
        assert case.match in err.lower(), err
        assert err.lstrip().startswith("error:") or "\nerror:" in err
    if db.exists():
        assert consistency_problems(db) == []


def test_duplicate_ids_import_once(tmp_path, capsys):
    path = bad_inputs.duplicate_ids(tmp_path / "dataset")
    db = tmp_path / "data" / "hscr.duckdb"
    assert hscr_main(["import", "folder", str(path), "--db", str(db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["imported"] == {"train": 1}
    assert report["duplicates"] == 1


def test_unknown_model_id_through_cli(tmp_path):
    db = tmp_path / "hscr.duckdb"
    Store(db).close()
    result = run_cli("generate", "--model", "no-such-org/no-such-model", "--db", str(db), "--device", "cpu")
    assert result.returncode == 2
    assert "error: model 'no-such-org/no-such-model' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_without_image_token(tmp_path, tiny_model_dir, capsys):
    model = bad_inputs.model_without_image_token(tmp_path, tiny_model_dir)
    db = tmp_path / "hscr.duckdb"
    Store(db).close()
    code = hscr_main(["generate", "--model", str(model), "--db", str(db), "--device", "cpu"])
    assert code == 2
    assert "no usable image token" in capsys.readouterr().err


def test_question_longer_than_context(tmp_path, tiny_model_dir, capsys):
    path = bad_inputs.long_question(tmp_path / "dataset")
    db = tmp_path / "hscr.duckdb"
    assert hscr_main(["import", "folder", str(path), "--db", str(db), "--no-progress"]) == 0

    code = hscr_main(["generate", "--model", str(tiny_model_dir), "--db", str(db), "--device", "cpu",
                      "--set", "num_coupled_tokens=2", "--json"])

    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 1
    assert summary["processed"] == 1                       # the normal row still got its candidates
    assert len(summary["errors"]) == 1
    assert "over the model's context window of 1024 tokens" in summary["errors"][0]
    with Store(db, read_only=True) as store:
        done = store.query("SELECT s.question FROM generation_done d JOIN samples s ON s.id = d.sample_id")
    assert [row["question"] for row in done] == [bad_inputs.GOOD_QUESTION]
