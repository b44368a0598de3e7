"""Exact scores of the paper and strict Med-VQA protocols on hard cases."""

import pytest

from hscr.metrics import closed_score_paper, closed_score_strict, normalize_text, score_answer, summarize, token_recall


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Left Lung.", "left lung"),
        ("An X-ray, of the chest!", "x ray of chest"),
        ("Two lesions", "2 lesions"),
        (4, "4"),
        (4.0, "4"),
        ("  yes ", "yes"),
        ("", ""),
        (None, ""),
        ("是的。", "是的"),
        ("不是，没有病变", "不是 没有病变"),
    ],
)
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


# (prediction, reference, paper, strict)
CLOSED_CASES = [
    ("no", "no", 1.0, 1.0),
    ("No.", "no", 1.0, 1.0),
    ("No, there is no lesion.", "No", 1.0, 1.0),
    ("normal", "no", 1.0, 0.0),            # substring: "no" occurs in "normal"
    ("not sure", "no", 1.0, 0.0),
    ("The heart is normal.", "no", 1.0, 0.0),
    ("yes", "no", 0.0, 0.0),
    ("Yes, and no effusion", "yes", 1.0, 1.0),
    ("no, yes", "yes", 1.0, 0.0),          # strict takes the first yes/no word
    ("", "no", 0.0, 0.0),
    ("", "yes", 0.0, 0.0),
    ("left", "Left", 1.0, 1.0),
    ("the leftward side", "left", 1.0, 0.0),
    ("transverse plane", "Transverse Plane", 1.0, 1.0),
    ("There are two nodules", "2", 1.0, 1.0),
    ("12", "2", 1.0, 0.0),
    ("four", 4, 1.0, 1.0),
    ("是的", "是的", 1.0, 1.0),
    ("是", "是的", 0.0, 1.0),
    ("不是", "是的", 0.0, 0.0),
    ("没有", "有", 1.0, 0.0),              # substring: 有 occurs in 没有
    ("有", "没有", 0.0, 0.0),
    ("不包含", "不包含", 1.0, 1.0),
    ("包含", "不包含", 0.0, 0.0),
    ("不可以。", "不可以", 1.0, 1.0),
    ("可以", "是的", 0.0, 1.0),
    ("不是，没有病变", "不是", 1.0, 1.0),
    ("yes", "是的", 0.0, 1.0),
    ("肺", "肺", 1.0, 1.0),
    ("左肺", "右肺", 0.0, 0.0),
    ("the answer", "the", 0.0, 0.0),       # a reference of only an article is empty after normalization
]


@pytest.mark.parametrize("prediction, reference, paper, strict", CLOSED_CASES)
def test_closed_scores(prediction, reference, paper, strict):
    assert closed_score_paper(prediction, reference) == paper
    assert closed_score_strict(prediction, reference) == strict


# (prediction, reference, recall)
OPEN_CASES = [
    ("left lung", "the left lung", 1.0),
    ("the right lung", "left lung", 0.5),
    ("Lung, left side.", "left lung", 1.0),
    ("", "left lung", 0.0),
    ("two", "2", 1.0),
    ("there are 3 lesions", "three lesions", 1.0),
    ("x-ray", "X-Ray", 1.0),
    ("ct", "MRI", 0.0),
    ("left left left", "left lower left lobe", 0.5),    # counts are clipped: 2 of 4
    ("heart", "the", 0.0),
    ("左肺", "左肺上叶", 0.5),                          # one token per CJK character
    ("肝脏", "肝脏", 1.0),
]


@pytest.mark.parametrize("prediction, reference, recall", OPEN_CASES)
def test_open_recall(prediction, reference, recall):
    assert token_recall(prediction, reference) == recall
    assert score_answer(prediction, reference, "open") == {"paper": recall, "strict": recall}


def test_score_answer_rejects_unknown_type():
    with pytest.raises(ValueError, match="answer_type"):
        score_answer("yes", "yes", "yes/no")


def test_summarize_rounds_percentages():
    rows = [
        {"answer_type": "closed", "paper": 1.0, "strict": 1.0},
        {"answer_type": "closed", "paper": 1.0, "strict": 0.0},
        {"answer_type": "closed", "paper": 0.0, "strict": 0.0},
        {"answer_type": "open", "paper": 0.5, "strict": 0.5},
        {"answer_type": "open", "paper": 1.0, "strict": 1.0},
        {"answer_type": "open", "paper": 0.0, "strict": 0.0},
    ]
    summary = summarize(rows)
    assert summary["paper"] == {"open_recall": 50.0, "closed_accuracy": 66.67}
    assert summary["strict"] == {"open_recall": 50.0, "closed_accuracy": 33.33}
    assert summary["counts"] == {"open": 3, "closed": 3}


def test_summarize_without_open_questions():
    summary = summarize([{"answer_type": "closed", "paper": 1.0, "strict": 1.0}])
    assert summary["paper"]["open_recall"] is None
    assert summary["paper"]["closed_accuracy"] == 100.0
    assert summary["counts"] == {"open": 0, "closed": 1}
