"""``python -m hscr score`` on LLaVA-Med answer and reference files, run as a child process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hscr.errors import DataError
from hscr.evaluate import read_references, score_files

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hscr", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def conversation(question, answer, key="conversations"):
    return {key: [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def llava_med_files(tmp_path):
    references = [
        {"id": 1, "image": "a.jpg", "answer_type": "CLOSED", **conversation("is there a lesion?", "yes")},
        {"id": 2, "image": "a.jpg", "answer_type": "CLOSED ", **conversation("is it abnormal?", "no", key="conversatons")},
        {"id": 3, "image": "b.jpg", "answer_type": "CLOSED", **conversation("is there a mass?", "No")},
        {"id": 4, "image": "b.jpg", "answer_type": "OPEN", **conversation("where is the lesion?", "left lung")},
        {"id": 5, "image": "c.jpg", "answer_type": "OPEN", **conversation("how many nodules?", "2")},
        {"id": 6, "image": "c.jpg", "answer_type": "CLOSED", **conversation("is the heart enlarged?", "yes")},
    ]
    # Out of order, ids as strings and integers, one answer without a reference, id 6 unanswered.
    predictions = [
        {"question_id": "3", "prompt": "is there a mass?", "text": "no", "answer_id": "x3", "model_id": "m", "metadata": {}},
        {"question_id": 1, "text": "Yes, there is."},
        {"question_id": 5, "text": "two nodules"},
        {"question_id": 2, "text": "normal"},
        {"question_id": 4, "text": "the right lung"},
        {"question_id": 99, "text": "yes"},
    ]
    ref_path = tmp_path / "test.json"
    ref_path.write_text(json.dumps(references), encoding="utf-8")
    pred_path = tmp_path / "answers.jsonl"
    pred_path.write_text("\n".join(json.dumps(p) for p in predictions) + "\n", encoding="utf-8")
    return pred_path, ref_path


def test_score_cli_json_line(llava_med_files):
    pred_path, ref_path = llava_med_files
    result = run_cli("score", "--predictions", str(pred_path), "--references", str(ref_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "paper": {"open_recall": 75.0, "closed_accuracy": 100.0},
        "strict": {"open_recall": 75.0, "closed_accuracy": 66.67},
        "counts": {"open": 2, "closed": 3},
    }
    assert "1 references have no prediction: 6" in result.stderr
    assert "1 predictions have no reference: 99" in result.stderr


def test_score_cli_table_without_json(llava_med_files):
    pred_path, ref_path = llava_med_files
    result = run_cli("score", "--predictions", str(pred_path), "--references", str(ref_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "scored 2 open and 3 closed questions"
    assert lines[2].split() == ["paper", "75.00", "100.00"]
    assert lines[3].split() == ["strict", "75.00", "66.67"]


def test_jsonl_references_with_inferred_types(tmp_path):
    references = tmp_path / "refs.jsonl"
    references.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"question_id": "a", "answer": 4, "answer_type": "OPEN"},
                {"question_id": "b", "answer": "Yes"},
                {"question_id": "c", "answer": "是的", "answer_type": "CLOSED"},
                {"question_id": "d", "answer": "Left"},
            ]
        ),
        encoding="utf-8",
    )
    parsed = read_references(references)
    assert [(k, v.answer, v.answer_type) for k, v in parsed.items()] == [
        ("a", "4", "open"), ("b", "Yes", "closed"), ("c", "是的", "closed"), ("d", "Left", "open"),
    ]
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text(
        "\n".join(json.dumps(p, ensure_ascii=False) for p in [
            {"question_id": "a", "text": "four"},
            {"question_id": "b", "text": "not sure"},
            {"question_id": "c", "text": "是"},
            {"question_id": "d", "text": ""},
        ]),
        encoding="utf-8",
    )
    scores = score_files(predictions, references)
    assert scores.summary["paper"] == {"open_recall": 50.0, "closed_accuracy": 0.0}
    assert scores.summary["strict"] == {"open_recall": 50.0, "closed_accuracy": 50.0}
    assert scores.missing_predictions == []
    assert scores.missing_references == []


def test_score_cli_invalid_json_line(tmp_path, llava_med_files):
    _, ref_path = llava_med_files
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": \n', encoding="utf-8")
    result = run_cli("score", "--predictions", str(broken), "--references", str(ref_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert "broken.jsonl line 2: invalid JSON" in result.stderr


def test_score_cli_missing_file(tmp_path, llava_med_files):
    pred_path, _ = llava_med_files
    result = run_cli("score", "--predictions", str(pred_path), "--references", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "references file not found" in result.stderr


def test_score_rejects_disjoint_files(tmp_path, llava_med_files):
    _, ref_path = llava_med_files
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question_id": "x1", "text": "yes"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="no question id"):
        score_files(other, ref_path)


def test_score_rejects_duplicate_ids(tmp_path, llava_med_files):
    _, ref_path = llava_med_files
    duplicated = tmp_path / "dup.jsonl"
    duplicated.write_text(
        json.dumps({"question_id": 1, "text": "yes"}) + "\n" + json.dumps({"question_id": "1", "text": "no"}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="line 2: duplicate question_id '1'"):
        score_files(duplicated, ref_path)


def test_reference_without_answer_field(tmp_path):
    references = tmp_path / "refs.json"
    references.write_text(json.dumps([{"id": 1, "answer_type": "OPEN", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(DataError, match="item 0: the conversation has no 'gpt' turn"):
        read_references(references)
