"""Reviewer actions: an append-only log in the ``reviews`` table, folded into a current state.

Generated rows are never changed. Each action a reviewer takes is a new row with the user and the
time, and :func:`review_state` replays a sample's rows in order, so the latest action wins.

Actions and their payloads:

========== ============== ======================================================================
action     candidate_id   payload
========== ============== ======================================================================
edit       id or None     ``{"text": str}``; None edits the preferred answer
rerank     None           ``{"order": [candidate_id, ...]}``: dispreferred answers for training,
                          least wrong first; ids not listed are not used
acceptable id             none; the answer is acceptable, so it is excluded from training
restore    id             none; undoes ``acceptable``
approve    None           none; sample status
reject     None           none; sample status, excluded from training and export
reopen     None           none; sample status back to pending
note       None or id     ``{"text": str}``
========== ============== ======================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hscr.errors import HSCRError
from hscr.store import Store

ACTIONS = ("edit", "rerank", "acceptable", "restore", "approve", "reject", "reopen", "note")
STATUS_ACTIONS = {"approve": "approved", "reject": "rejected", "reopen": "pending"}
MAX_TEXT = 4000


@dataclass
class ReviewState:
    """The current review of one sample after replaying its rows."""

    status: str = "pending"                          # pending, approved, rejected
    chosen_text: str | None = None                   # edited preferred answer, if any
    edits: dict[str, str] = field(default_factory=dict)   # candidate id -> edited text
    excluded: set[str] = field(default_factory=set)       # candidate ids marked acceptable
    order: list[str] | None = None                   # reranked dispreferred ids, if any
    notes: list[dict[str, Any]] = field(default_factory=list)
    num_actions: int = 0


def record_review(
    store: Store,
    user: str,
    sample_id: str,
    action: str,
    candidate_id: str | None = None,
    payload: dict[str, Any] | None = None,
) -> int:
    """Validate one reviewer action and append it; returns the new review row id."""
    payload = dict(payload or {})
    if action not in ACTIONS:
        raise HSCRError(f"unknown review action {action!r}; expected one of {', '.join(ACTIONS)}")
    if not store.execute("SELECT 1 FROM samples WHERE id = ?", [sample_id]).fetchall():
        raise HSCRError(f"sample {sample_id!r} not found")
    if candidate_id is not None:
        rows = store.execute(
            "SELECT 1 FROM candidates WHERE id = ? AND sample_id = ?", [candidate_id, sample_id]
        ).fetchall()
        if not rows:
            raise HSCRError(f"candidate {candidate_id!r} not found for sample {sample_id!r}")
    if action in ("edit", "note"):
        text = payload.get("text")
        if not isinstance(text, str) or not text.strip():
            raise HSCRError(f"a {action} needs a non-empty text")
        if len(text) > MAX_TEXT:
            raise HSCRError(f"the {action} text has {len(text)} characters; the maximum is {MAX_TEXT}")
        payload["text"] = text.strip()
    if action in ("acceptable", "restore") and candidate_id is None:
        raise HSCRError(f"'{action}' needs the id of a dispreferred answer")
    if action == "rerank":
        order = payload.get("order")
        if not isinstance(order, list) or not order or not all(isinstance(i, str) for i in order):
            raise HSCRError("a rerank needs 'order': a non-empty list of candidate ids")
        if len(set(order)) != len(order):
            raise HSCRError("a rerank order lists a candidate twice")
        known = {
            r[0]
            for r in store.execute(
                "SELECT id FROM candidates WHERE sample_id = ? AND num_replaced > 0", [sample_id]
            ).fetchall()
        }
        unknown = [i for i in order if i not in known]
        if unknown:
            raise HSCRError(f"rerank lists unknown candidate ids for this sample: {', '.join(unknown)}")
    return store.add_review(user, sample_id, action, payload, candidate_id)


def fold_reviews(rows: list[dict[str, Any]]) -> ReviewState:
    """Replay review rows (ordered by id) into the current state."""
    state = ReviewState()
    for row in rows:
        payload = json.loads(row.get("payload_json") or "{}")
        action = row["action"]
        candidate_id = row.get("candidate_id")
        state.num_actions += 1
        if action in STATUS_ACTIONS:
            state.status = STATUS_ACTIONS[action]
        elif action == "edit":
            if candidate_id is None:
                state.chosen_text = payload["text"]
            else:
                state.edits[candidate_id] = payload["text"]
        elif action == "rerank":
            state.order = list(payload["order"])
        elif action == "acceptable":
            state.excluded.add(candidate_id)
        elif action == "restore":
            state.excluded.discard(candidate_id)
        elif action == "note":
            state.notes.append({"user": row["user"], "created_at": row["created_at"], "text": payload["text"]})
    return state


def review_state(store: Store, sample_id: str) -> ReviewState:
    return fold_reviews(store.reviews_for(sample_id))


def review_states(store: Store, sample_ids: list[str] | None = None) -> dict[str, ReviewState]:
    """Fold the reviews of many samples with one query."""
    if sample_ids is None:
        rows = store.query("SELECT * FROM reviews ORDER BY id")
    else:
        if not sample_ids:
            return {}
        rows = store.query("SELECT * FROM reviews WHERE sample_id IN (SELECT unnest(?)) ORDER BY id", [sample_ids])
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["sample_id"], []).append(row)
    return {sid: fold_reviews(group) for sid, group in grouped.items()}
