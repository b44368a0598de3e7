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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- the same corpus through the app ---------------------------------------------------------------


def app_import(client, case: bad_inputs.Case, path: Path) -> str:
    """Import a dataset case through the app; return the report, or the error message it raised."""
    from gradio_client.exceptions import AppError

    try:
        return client.predict(case.kind, str(path), "", "train", api_name="/import_dataset")
    except AppError as exc:
        return f"error: {exc}"


@pytest.mark.slow
def test_corpus_through_app(tmp_path, tiny_model_dir):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from browser import AppProcess

    corpus, by_line = bad_inputs.write_image_corpus(tmp_path / "corpus")
    files = {case.name: corpus / name for case, name in zip(by_line.values(), _image_names(corpus))}
    db = tmp_path / "data" / "hscr.duckdb"
    Store(db).close()

    with AppProcess(db, tiny_model_dir) as app:
        client = Client(app.url, verbose=False)
        upload = [handle_file(str(corpus / "good.png"))] + [handle_file(str(path)) for path in files.values()]
        report = client.predict(upload, "uploads", "train", "what does the image show ?", "a lung",
                                api_name="/upload_files")
        reports = {}
        for index, case in enumerate(bad_inputs.DATASET_CASES):
            path = case.build(tmp_path / f"dataset-{index:02d}")
            reports[case.name] = app_import(client, case, path)
        long_dataset = bad_inputs.long_question(tmp_path / "long")
        client.predict("folder", str(long_dataset), "long", "train", api_name="/import_dataset")
        client.predict(api_name="/refresh_filters")            # as the page does after an import
        table = client.predict("long", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[0]
        questions = {row[table["headers"].index("question")]: row[table["headers"].index("id")] for row in table["data"]}
        long_id = next(sample for question, sample in questions.items() if len(question) > 1000)
        with pytest.raises(AppError, match="context window of 1024 tokens"):
            client.predict(long_id, "left lung", 0.7, 0.9, 3, api_name="/analyze")
        counts = client.predict("(all)", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[1]
        assert app.process.poll() is None                      # the app survived every case

    lines = report.splitlines()
    for case, path in zip(by_line.values(), files.values()):
        mentions = [line for line in lines if line.startswith(f"- error: {path.name}:")]
        if case.expect == "error":
            assert len(mentions) == 1, f"{case.name}: {report}"
            assert case.match in mentions[0].lower(), f"{case.name}: {mentions[0]}"
        else:
            assert mentions == [], f"{case.name}: {mentions}"
    imported = 1 + sum(case.expect == "import" for case in by_line.values())
    assert f"imported {imported} samples" in report
    for case in bad_inputs.DATASET_CASES:
        text = reports[case.name]
        if case.expect == "import":
            assert "imported 1 samples" in text, f"{case.name}: {text}"
            assert "- error:" not in text, f"{case.name}: {text}"
        else:
            assert case.match in text.lower(), f"{case.name}: {text}"
    assert "**" in counts
    assert consistency_problems(db) == []
    assert not list((tmp_path / "data" / "cache" / "gradio").rglob("*.dcm"))   # raw uploads are removed


def _image_names(corpus: Path) -> list[str]:
    """The image file of each corpus row after the control row, in line order."""
    import csv

    with open(corpus / "samples.csv", encoding="utf-8") as handle:
        return [row["image"] for row in csv.DictReader(handle)][1:]


@pytest.mark.slow
def test_unknown_model_through_app(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from browser import AppProcess
    from hardening_support import seed_review_db

    db = tmp_path / "data" / "hscr.duckdb"
    samples = seed_review_db(db, tmp_path, num_samples=1)
    with AppProcess(db, "no-such-org/no-such-model", extra_args=["--no-demo"]) as app:
        client = Client(app.url, verbose=False)
        sample = next(iter(samples))
        with pytest.raises(AppError, match="model 'no-such-org/no-such-model' not found"):
            client.predict(sample, "yes", 0.7, 0.9, 3, api_name="/analyze")
        view = client.predict("(all)", "(all)", 1, api_name="/review_view")
        assert view[0] == sample                                 # reviewing works without the model
        assert app.process.poll() is None
