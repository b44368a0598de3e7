"""Paired comparison of evaluation runs and McNemar's exact test."""

import io

import pytest
from scipy.stats import binomtest
from support import random_image

from hscr.compare import compare_runs, mcnemar_exact, outcome
from hscr.errors import HSCRError
from hscr.metrics import score_answer
from hscr.store import Store


@pytest.mark.parametrize(
    "b, c, expected",
    [
        (0, 0, 1.0),
        (1, 6, 0.125),          # 2 * (C(7,0) + C(7,1)) / 2**7
        (6, 1, 0.125),
        (0, 5, 0.0625),         # 2 / 2**5
        (3, 3, 1.0),            # the doubled tail exceeds 1
        (2, 10, 0.0385742187),  # 2 * (1 + 12 + 66) / 2**12
    ],
)
def test_mcnemar_exact_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("b, c", [(4, 9), (10, 25), (0, 1), (17, 17)])
def test_mcnemar_matches_binomial_test(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)


def test_outcome_directions():
    assert outcome(0.0, 1.0) == "fixed"
    assert outcome(1.0, 0.0) == "broken"
    assert outcome(0.5, 0.5) == "unchanged"
    assert outcome(0.5, 0.75) == "fixed"


# (question, answer, base prediction, adapter prediction)
PAIRS = [
    ("is there a lesion?", "yes", "no", "yes"),                 # closed fixed
    ("is the heart enlarged?", "no", "normal", "no"),           # closed fixed (strict); paper: unchanged
    ("is there a mass?", "no", "no", "yes"),                    # closed broken
    ("is there effusion?", "yes", "yes", "yes"),                # closed unchanged
    ("is it an mri?", "no", "yes", "no"),                       # closed fixed
    ("where is the lesion?", "left lung", "right lung", "left lung"),   # open fixed: 0.5 -> 1.0
    ("which organ?", "liver", "liver", "kidney"),               # open broken
]


@pytest.fixture
def store(tmp_path):
    db = Store(tmp_path / "hscr.duckdb")
    buffer = io.BytesIO()
    random_image(0).save(buffer, format="PNG")
    image_id = db.add_image(buffer.getvalue(), 64, 64)
    for run_id, column in (("base", 2), ("lora", 3)):
        db.execute("INSERT INTO eval_runs (id, model, adapter, dataset, split) VALUES (?, 'm', ?, 'd', 'test')",
                   [run_id, None if run_id == "base" else "adapter"])
    for pair in PAIRS:
        answer_type = "closed" if pair[1] in ("yes", "no") else "open"
        sample_id, _ = db.add_sample("d", "test", image_id, pair[0], pair[1], answer_type)
        for run_id, text in (("base", pair[2]), ("lora", pair[3])):
            scores = score_answer(text, pair[1], answer_type)
            db.execute(
                "INSERT INTO predictions (eval_run_id, sample_id, model, text, score_paper, score_strict) VALUES (?, ?, 'm', ?, ?, ?)",
                [run_id, sample_id, text, scores["paper"], scores["strict"]],
            )
    yield db
    db.close()


def test_compare_runs_strict(store):
    result = compare_runs(store, "base", "lora")
    by_question = {s["question"]: s for s in result["samples"]}
    assert [by_question[p[0]]["outcome"] for p in PAIRS] == [
        "fixed", "fixed", "broken", "unchanged", "fixed", "fixed", "broken",
    ]
    assert by_question["where is the lesion?"]["base_score"] == 0.5
    assert by_question["where is the lesion?"]["other_text"] == "left lung"
    assert result["counts"]["all"] == {"fixed": 4, "broken": 2, "unchanged": 1}
    assert result["counts"]["closed"] == {"fixed": 3, "broken": 1, "unchanged": 1}
    assert result["counts"]["open"] == {"fixed": 1, "broken": 1, "unchanged": 0}
    assert result["mcnemar"]["b"] == 1
    assert result["mcnemar"]["c"] == 3
    assert result["mcnemar"]["p_value"] == 0.625       # 2 * (1 + 4) / 2**4
    assert (result["only_in_base"], result["only_in_other"]) == (0, 0)


def test_compare_runs_paper_protocol(store):
    result = compare_runs(store, "base", "lora", protocol="paper")
    by_question = {s["question"]: s["outcome"] for s in result["samples"]}
    assert by_question["is the heart enlarged?"] == "unchanged"    # "no" occurs in "normal"
    assert result["mcnemar"] == {"b": 1, "c": 2, "n": 3, "p_value": 1.0}


def test_compare_counts_unshared_samples(store):
    first = store.samples("d", "test")[0]["id"]
    store.execute("DELETE FROM predictions WHERE eval_run_id = 'lora' AND sample_id = ?", [first])
    result = compare_runs(store, "base", "lora")
    assert len(result["samples"]) == len(PAIRS) - 1
    assert (result["only_in_base"], result["only_in_other"]) == (1, 0)


def test_compare_rejects_bad_input(store):
    with pytest.raises(HSCRError, match="invalid protocol 'exact'"):
        compare_runs(store, "base", "lora", protocol="exact")
    with pytest.raises(HSCRError, match="run 'missing' has no predictions"):
        compare_runs(store, "base", "missing")
