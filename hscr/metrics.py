"""Med-VQA answer scoring under two protocols.

``paper`` is the protocol behind the published LLaVA-Med and HSCR numbers: a closed question
scores 1 when the normalized reference occurs anywhere in the normalized prediction (so "normal"
counts as "no"), an open question scores the recall of the reference's normalized tokens.
``strict`` keeps the open recall but scores a closed question by a whole-word match, after
mapping yes/no variants (English and the Chinese answers of SLAKE) to "yes" and "no".

Normalization: lowercase, punctuation to spaces, number words to digits, articles dropped.
Chinese text has no spaces, so recall and whole-word matching treat each CJK character as a token.

    from hscr.metrics import score_answer
    score_answer("No, the heart is normal.", "no", "closed")   # {"paper": 1.0, "strict": 1.0}
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any, Iterable

PROTOCOLS = ("paper", "strict")

ARTICLES = frozenset({"a", "an", "the"})

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40",
    "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100",
}

# Closed answers in SLAKE's Chinese split: 是的/不是, 有/没有, 包含/不包含, 可以/不可以.
YES_WORDS = frozenset({"yes", "是", "是的", "有", "包含", "可以"})
NO_WORDS = frozenset({"no", "不是", "没有", "不包含", "不可以"})
# Longest first, so that a Chinese prefix match finds 不是 before 是 and 没有 before 有.
_CJK_POLARITY = sorted(
    [(word, "yes") for word in YES_WORDS if not word.isascii()]
    + [(word, "no") for word in NO_WORDS if not word.isascii()],
    key=lambda item: -len(item[0]),
)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in ("P", "S")


def normalize_text(text: Any) -> str:
    """Lowercase, replace punctuation by spaces, turn number words into digits, drop articles."""
    if text is None:
        return ""
    if isinstance(text, float) and text.is_integer():
        text = int(text)  # JSON answers such as 4.0 mean the integer
    lowered = unicodedata.normalize("NFKC", str(text)).lower()
    spaced = "".join(" " if _is_punctuation(char) else char for char in lowered)
    words = [NUMBER_WORDS.get(word, word) for word in spaced.split() if word not in ARTICLES]
    return " ".join(words)


def tokens(normalized: str) -> list[str]:
    """Split normalized text into words; runs of CJK characters become one token per character."""
    out: list[str] = []
    for word in normalized.split():
        if _CJK.search(word):
            out.extend(piece for piece in re.split(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])", word) if piece)
        else:
            out.append(word)
    return out


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's normalized tokens that the prediction contains (counts clipped)."""
    reference_tokens = Counter(tokens(normalize_text(reference)))
    total = sum(reference_tokens.values())
    if total == 0:
        return 0.0
    prediction_tokens = Counter(tokens(normalize_text(prediction)))
    overlap = reference_tokens & prediction_tokens
    return sum(overlap.values()) / total


def polarity(normalized_word: str) -> str | None:
    """Return "yes" or "no" when a whole normalized answer is a yes/no variant, else None."""
    compact = normalized_word.replace(" ", "")
    if compact in YES_WORDS:
        return "yes"
    if compact in NO_WORDS:
        return "no"
    return None


def first_polarity(normalized: str) -> str | None:
    """Return the polarity of the first yes/no word of a prediction.

    An English word must be exactly "yes" or "no" ("normal" and "not" are neither). A Chinese word
    counts when it starts with a variant, because Chinese answers run on without spaces
    ("不是，没有病变" is "no").
    """
    for word in normalized.split():
        if word in YES_WORDS:
            return "yes"
        if word in NO_WORDS:
            return "no"
        if _CJK.match(word):
            for variant, value in _CJK_POLARITY:
                if word.startswith(variant):
                    return value
    return None


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    width = len(needle)
    return any(haystack[i : i + width] == needle for i in range(len(haystack) - width + 1))


def closed_score_paper(prediction: Any, reference: Any) -> float:
    """1.0 when the normalized reference occurs in the normalized prediction as a substring."""
    ref = normalize_text(reference)
    if not ref:
        return 0.0
    return 1.0 if ref in normalize_text(prediction) else 0.0


def closed_score_strict(prediction: Any, reference: Any) -> float:
    """1.0 on a yes/no polarity match, or when the reference's words occur as whole words."""
    ref = normalize_text(reference)
    pred = normalize_text(prediction)
    expected = polarity(ref)
    if expected is not None:
        return 1.0 if first_polarity(pred) == expected else 0.0
    ref_tokens = tokens(ref)
    if not ref_tokens:
        return 0.0
    return 1.0 if _contains_run(tokens(pred), ref_tokens) else 0.0


def score_answer(prediction: Any, reference: Any, answer_type: str) -> dict[str, float]:
    """Score one prediction under both protocols: ``{"paper": x, "strict": y}`` in [0, 1]."""
    if answer_type == "closed":
        return {"paper": closed_score_paper(prediction, reference), "strict": closed_score_strict(prediction, reference)}
    if answer_type == "open":
        recall = token_recall(str(prediction or ""), reference)
        return {"paper": recall, "strict": recall}
    raise ValueError(f"invalid answer_type {answer_type!r}: expected 'open' or 'closed'")


def _percent(values: list[float]) -> float | None:
    if not values:
        return None
    return round(100.0 * math.fsum(values) / len(values), 2)


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-sample scores into percentages rounded to 2 decimals.

    Each row has ``answer_type`` and the per-protocol scores ``paper`` and ``strict``. Returns
    ``{"paper": {"open_recall", "closed_accuracy"}, "strict": {...}, "counts": {"open", "closed"}}``;
    a percentage is None when there is no question of that type.
    """
    scores: dict[str, dict[str, list[float]]] = {p: {"open": [], "closed": []} for p in PROTOCOLS}
    counts = {"open": 0, "closed": 0}
    for row in rows:
        kind = row["answer_type"]
        counts[kind] += 1
        for protocol in PROTOCOLS:
            scores[protocol][kind].append(float(row[protocol]))
    summary: dict[str, Any] = {
        protocol: {
            "open_recall": _percent(scores[protocol]["open"]),
            "closed_accuracy": _percent(scores[protocol]["closed"]),
        }
        for protocol in PROTOCOLS
    }
    summary["counts"] = counts
    return summary
