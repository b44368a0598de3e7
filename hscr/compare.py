"""Paired comparison of two evaluation runs on the same samples (base model vs adapter).

Each sample both runs answered gets an outcome: ``fixed`` (the other run scores higher),
``broken`` (it scores lower) or ``unchanged``. On closed questions, where scores are 0 or 1,
McNemar's exact test asks whether the discordant pairs lean one way more than chance allows:
``b`` counts questions the base answered right and the other run wrong, ``c`` the reverse, and
the two-sided p-value is ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``.

    from hscr.compare import compare_runs
    result = compare_runs(store, base_run_id, adapter_run_id)
    result["mcnemar"]   # {"b": 3, "c": 11, "n": 14, "p_value": 0.057...}
"""

from __future__ import annotations

import math
from typing import Any

from hscr.errors import HSCRError
from hscr.evaluate import run_predictions
from hscr.metrics import PROTOCOLS
from hscr.store import Store


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when both are 0)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))    # exact integers, no rounding
    return min(1.0, 2 * tail / 2**n)


def outcome(base_score: float, other_score: float) -> str:
    """Return ``fixed``, ``broken`` or ``unchanged`` for one sample's pair of scores."""
    if other_score > base_score:
        return "fixed"
    if other_score < base_score:
        return "broken"
    return "unchanged"


def compare_runs(store: Store, base_run: str, other_run: str, protocol: str = "strict") -> dict[str, Any]:
    """Compare two evaluation runs sample by sample under ``protocol`` ("paper" or "strict").

    Returns ``samples`` (one dict per shared sample: sample_id, question, answer, answer_type,
    base_text, other_text, base_score, other_score, outcome), ``counts`` of the outcomes overall
    and per answer type, ``mcnemar`` (b, c, n and p_value over closed questions), and how many
    samples only one run answered. Strict is the default because the "paper" protocol credits
    "normal" as "no" and so counts changes that are not real.
    """
    if protocol not in PROTOCOLS:
        raise HSCRError(f"invalid protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    base = {row["sample_id"]: row for row in run_predictions(store, base_run)}
    other = {row["sample_id"]: row for row in run_predictions(store, other_run)}
    for run_id, rows in ((base_run, base), (other_run, other)):
        if not rows:
            raise HSCRError(f"evaluation run {run_id!r} has no predictions in {store.db_path}")
    shared = [sample_id for sample_id in base if sample_id in other]
    if not shared:
        raise HSCRError(
            f"evaluation runs {base_run!r} and {other_run!r} share no sample; evaluate both on the same dataset split"
        )

    key = f"score_{protocol}"
    samples = []
    counts = {kind: {"fixed": 0, "broken": 0, "unchanged": 0} for kind in ("all", "open", "closed")}
    b = c = 0
    for sample_id in shared:
        before, after = base[sample_id], other[sample_id]
        result = outcome(before[key], after[key])
        counts["all"][result] += 1
        counts[before["answer_type"]][result] += 1
        if before["answer_type"] == "closed":
            b += result == "broken"
            c += result == "fixed"
        samples.append(
            {
                "sample_id": sample_id,
                "question": before["question"],
                "answer": before["answer"],
                "answer_type": before["answer_type"],
                "base_text": before["text"],
                "other_text": after["text"],
                "base_score": before[key],
                "other_score": after[key],
                "outcome": result,
            }
        )
    return {
        "base_run": base_run,
        "other_run": other_run,
        "protocol": protocol,
        "samples": samples,
        "counts": counts,
        "mcnemar": {"b": b, "c": c, "n": b + c, "p_value": mcnemar_exact(b, c)},
        "only_in_base": len(base) - len(shared),
        "only_in_other": len(other) - len(shared),
    }
