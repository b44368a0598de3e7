"""The preference data that training and export use: generated candidates with reviews applied.

Each sample uses one generation run: the named run, else the run whose candidates a reviewer
last acted on, else its latest run. The chosen answer is the reference answer or its latest edit.
The rejected answers are the kept dispreferred answers, least wrong first, or a reviewer's order.
Answers marked acceptable are left out, and edited texts replace the generated ones. An edited
text's reference log-prob becomes unknown, so the trainer recomputes it. Rejected samples are
left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hscr.reviews import review_states
from hscr.store import Store


@dataclass
class PreferenceRow:
    """One sample's chosen answer and its ordered rejected answers."""

    sample_id: str
    dataset: str
    split: str
    image_path: str                      # absolute path of the stored PNG
    question: str
    answer_type: str
    chosen: str
    rejected: list[str] = field(default_factory=list)          # least wrong first
    similarities: list[float | None] = field(default_factory=list)
    ref_chosen_logp: float | None = None                        # None: recompute (edited text)
    ref_rejected_logps: list[float | None] = field(default_factory=list)
    run_id: str = ""
    model: str = ""


def load_preferences(
    store: Store,
    reviewed_only: bool = False,
    dataset: str | None = None,
    run_id: str | None = None,
    split: str | None = None,
) -> list[PreferenceRow]:
    """Return the effective preference rows, in a stable sample order."""
    where = ["TRUE"]
    params: list[Any] = []
    if run_id:
        where.append("d.run_id = ?")
        params.append(run_id)
    if dataset:
        where.append("s.dataset = ?")
        params.append(dataset)
    if split:
        where.append("s.split = ?")
        params.append(split)
    # Per sample: the run whose candidates a reviewer last acted on, else the latest finished run,
    # unless a run is named. So generating again never hides a sample's review work.
    done = store.query(
        f"""
        WITH reviewed AS (
            SELECT c.sample_id, c.run_id, max(v.id) AS last_review
            FROM reviews v
            JOIN candidates c ON c.sample_id = v.sample_id
             AND (c.id = v.candidate_id
                  OR (v.action = 'rerank' AND json_extract_string(v.payload_json, '$.order[0]') = c.id))
            GROUP BY c.sample_id, c.run_id
        )
        SELECT d.sample_id, d.run_id, r.model, s.dataset, s.split, s.question, s.answer_type, i.path AS image_path
        FROM generation_done d
        JOIN generation_runs r ON r.id = d.run_id
        JOIN samples s ON s.id = d.sample_id
        JOIN images i ON i.id = s.image_id
        LEFT JOIN reviewed v ON v.sample_id = d.sample_id AND v.run_id = d.run_id
        WHERE {' AND '.join(where)}
        QUALIFY row_number() OVER (
            PARTITION BY d.sample_id ORDER BY v.last_review DESC NULLS LAST, d.done_at DESC, d.run_id
        ) = 1
        ORDER BY s.dataset, s.split, s.id
        """,
        params,
    )
    if not done:
        return []
    candidates = store.query(
        """
        SELECT c.* FROM candidates c
        JOIN (SELECT unnest(?) AS sample_id, unnest(?) AS run_id) k
          ON k.sample_id = c.sample_id AND k.run_id = c.run_id
        ORDER BY c.sample_id, c.rank NULLS LAST, c.num_replaced
        """,
        [[d["sample_id"] for d in done], [d["run_id"] for d in done]],
    )
    by_sample: dict[str, list[dict[str, Any]]] = {}
    for cand in candidates:
        by_sample.setdefault(cand["sample_id"], []).append(cand)
    states = review_states(store, [d["sample_id"] for d in done])

    rows: list[PreferenceRow] = []
    for item in done:
        sample_id = item["sample_id"]
        state = states.get(sample_id)
        if state is not None and state.status == "rejected":
            continue
        if reviewed_only and (state is None or state.status != "approved"):
            continue
        cands = by_sample.get(sample_id, [])
        preferred = next((c for c in cands if c["num_replaced"] == 0), None)
        if preferred is None:
            continue
        others = {c["id"]: c for c in cands if c["num_replaced"] > 0}
        if state is not None and state.order is not None:
            ordered = [others[i] for i in state.order if i in others]
        else:
            ordered = [c for c in cands if c["num_replaced"] > 0 and c["kept"]]
        excluded = state.excluded if state is not None else set()
        ordered = [c for c in ordered if c["id"] not in excluded]
        if not ordered:
            continue
        edits = state.edits if state is not None else {}
        chosen_text = state.chosen_text if state is not None and state.chosen_text else preferred["text"]
        chosen_logp = preferred["ref_logp"] if chosen_text == preferred["text"] else None
        rejected, logps = [], []
        for cand in ordered:
            text = edits.get(cand["id"], cand["text"])
            rejected.append(text)
            logps.append(cand["ref_logp"] if text == cand["text"] else None)
        rows.append(
            PreferenceRow(
                sample_id=sample_id,
                dataset=item["dataset"],
                split=item["split"],
                image_path=str((store.data_dir / item["image_path"]).resolve()),
                question=item["question"],
                answer_type=item["answer_type"],
                chosen=chosen_text,
                rejected=rejected,
                similarities=[c["similarity"] for c in ordered],
                ref_chosen_logp=chosen_logp,
                ref_rejected_logps=logps,
                run_id=item["run_id"],
                model=item["model"],
            )
        )
    return rows


def write_preferences_parquet(rows: list[PreferenceRow], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
            ("image_path", pa.string()), ("question", pa.string()), ("answer_type", pa.string()),
            ("chosen", pa.string()), ("rejected", pa.list_(pa.string())),
            ("similarities", pa.list_(pa.float64())), ("ref_chosen_logp", pa.float64()),
            ("ref_rejected_logps", pa.list_(pa.float64())), ("run_id", pa.string()), ("model", pa.string()),
        ]
    )
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=schema)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_preferences_parquet(path: str | Path) -> list[PreferenceRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [PreferenceRow(**row) for row in table.to_pylist()]


def preferences_summary(rows: list[PreferenceRow]) -> dict[str, Any]:
    counts = [len(r.rejected) for r in rows]
    return {
        "samples": len(rows),
        "pairs_explicit": sum(counts),
        "pairs_implicit": sum(c * (c - 1) // 2 for c in counts),
        "needs_ref_logps": sum(
            (r.ref_chosen_logp is None) + sum(v is None for v in r.ref_rejected_logps) for r in rows
        ),
    }


def to_json(rows: list[PreferenceRow]) -> str:
    return json.dumps([asdict(r) for r in rows], ensure_ascii=False)
