"""Read-only queries behind the app's sample lists and review queue.

A sample's review status is its latest ``approve``/``reject``/``reopen`` row (``pending`` when
there is none), computed in SQL so a page of 100k candidates needs one indexed query and no
replay in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hscr.store import Store

STATUSES = ("pending", "approved", "rejected")

STATUS_SQL = """
    SELECT sample_id,
           CASE arg_max(action, id) WHEN 'approve' THEN 'approved' WHEN 'reject' THEN 'rejected'
                ELSE 'pending' END AS status
    FROM reviews WHERE action IN ('approve', 'reject', 'reopen') GROUP BY sample_id
"""


@dataclass
class SampleFilter:
    """The filters of the sample browser and the review queue; empty values match everything."""

    dataset: str | None = None
    split: str | None = None
    modality: str | None = None
    answer_type: str | None = None
    status: str | None = None
    generated_only: bool = False       # only samples with generated candidates (the review queue)

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, value in (("s.dataset", self.dataset), ("s.split", self.split),
                              ("i.modality", self.modality), ("s.answer_type", self.answer_type)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.status:
            clauses.append("coalesce(st.status, 'pending') = ?")
            params.append(self.status)
        if self.generated_only:
            clauses.append("s.id IN (SELECT sample_id FROM generation_done)")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _from_clause() -> str:
    return (
        f"FROM samples s JOIN images i ON i.id = s.image_id LEFT JOIN ({STATUS_SQL}) st ON st.sample_id = s.id"
    )


def filter_choices(store: Store) -> dict[str, list[str]]:
    """Return the distinct values of each filter column."""
    def distinct(sql: str) -> list[str]:
        return [row[0] for row in store.execute(sql).fetchall() if row[0] is not None]

    return {
        "dataset": distinct("SELECT DISTINCT dataset FROM samples ORDER BY 1"),
        "split": distinct("SELECT DISTINCT split FROM samples ORDER BY 1"),
        "modality": distinct("SELECT DISTINCT modality FROM images ORDER BY 1"),
        "answer_type": distinct("SELECT DISTINCT answer_type FROM samples ORDER BY 1"),
        "status": list(STATUSES),
    }


def count_samples(store: Store, flt: SampleFilter) -> dict[str, int]:
    """Count the matching samples in total and per review status."""
    where, params = flt.where()
    rows = store.execute(
        f"SELECT coalesce(st.status, 'pending'), count(*) {_from_clause()}{where} GROUP BY 1", params
    ).fetchall()
    counts = {status: 0 for status in STATUSES}
    counts.update({status: int(n) for status, n in rows})
    counts["total"] = sum(counts[s] for s in STATUSES)
    return counts


def list_samples(store: Store, flt: SampleFilter, offset: int = 0, limit: int = 50) -> list[dict[str, Any]]:
    """Return one page of matching samples, ordered by dataset, split and id."""
    where, params = flt.where()
    return store.query(
        "SELECT s.id, s.dataset, s.split, i.modality, s.answer_type, s.question, s.answer, "
        f"coalesce(st.status, 'pending') AS status {_from_clause()}{where} "
        "ORDER BY s.dataset, s.split, s.id LIMIT ? OFFSET ?",
        params + [int(limit), int(max(offset, 0))],
    )


def sample_at(store: Store, flt: SampleFilter, index: int) -> dict[str, Any] | None:
    """Return the ``index``-th matching sample (the review queue's current item)."""
    rows = list_samples(store, flt, offset=index, limit=1)
    return rows[0] if rows else None


def sample_detail(store: Store, sample_id: str) -> dict[str, Any] | None:
    """Return one sample with its image path, modality, source format and image metadata."""
    rows = store.query(
        "SELECT s.*, i.path AS image_path, i.modality, i.source_format, i.meta_json AS image_meta_json, "
        "i.width, i.height FROM samples s JOIN images i ON i.id = s.image_id WHERE s.id = ?",
        [sample_id],
    )
    return rows[0] if rows else None


def model_answer(store: Store, sample_id: str) -> str | None:
    """Return the model's stored greedy answer from the latest generation run, if any."""
    rows = store.execute(
        "SELECT model_answer FROM generation_done WHERE sample_id = ? AND model_answer IS NOT NULL "
        "ORDER BY done_at DESC LIMIT 1",
        [sample_id],
    ).fetchall()
    return rows[0][0] if rows else None
