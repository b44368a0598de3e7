"""Review tab: a queue of generated samples, their ranked dispreferred answers, and reviewer actions.

Every action appends one row to ``reviews`` through :func:`hscr.reviews.record_review`, with the
user and the time; nothing generated is changed. Keyboard shortcuts (outside text fields):
``a`` approve, ``r`` reject, ``j``/``→`` next, ``k``/``←`` previous, ``n`` write a note.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import plots, queries, snapshots
from app.state import AppContext, bind, user_name
from hscr.errors import HSCRError
from hscr.images import open_stored
from hscr.reviews import ReviewState, fold_reviews, record_review, review_state

logger = logging.getLogger(__name__)

ALL = "(all)"
HISTORY_COLUMNS = ["id", "time (UTC)", "user", "action", "answer", "details"]

SHORTCUTS_JS = """
() => {
  if (window.hscrShortcuts) return;
  window.hscrShortcuts = true;
  const keys = {a: 'review-approve', r: 'review-reject', j: 'review-next', ArrowRight: 'review-next',
                k: 'review-prev', ArrowLeft: 'review-prev'};
  document.addEventListener('keydown', (event) => {
    const target = event.target;
    const tag = (target && target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || tag === 'select' || (target && target.isContentEditable)) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const panel = document.getElementById('review-panel');
    if (!panel || panel.offsetParent === null) return;
    if (event.key === 'n') {
      const note = document.querySelector('#review-note textarea');
      if (note) { note.focus(); event.preventDefault(); }
      return;
    }
    const id = keys[event.key];
    const button = id && document.getElementById(id);
    if (button) { button.click(); event.preventDefault(); }
  });
}
"""


def _queue_filter(dataset: str, status: str) -> queries.SampleFilter:
    return queries.SampleFilter(
        dataset=None if dataset in (None, "", ALL) else dataset,
        status=None if status in (None, "", ALL) else status,
        generated_only=True,
    )


def dispreferred(
    context: AppContext, sample_id: str, state: ReviewState, candidates: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Return the sample's dispreferred answers, numbered, with reviews applied.

    The default training order is the kept answers by rank (most similar first); a rerank
    replaces it. Answers marked acceptable are excluded from training. ``candidates`` saves a
    query when the caller already read the sample's candidates.
    """
    if candidates is None:
        candidates = context.store.candidates_for(sample_id)
    rows = [c for c in candidates if c["num_replaced"] > 0]
    rows.sort(key=lambda c: (not c["kept"], c["rank"] if c["rank"] is not None else 1 << 30, c["num_replaced"]))
    if state.order is not None:
        order = [cid for cid in state.order if cid not in state.excluded]
    else:
        order = [c["id"] for c in rows if c["kept"] and c["id"] not in state.excluded]
    training_rank = {cid: index for index, cid in enumerate(order, start=1)}
    out = []
    for number, row in enumerate(rows, start=1):
        out.append({
            **row,
            "number": number,
            "current_text": state.edits.get(row["id"], row["text"]),
            "edited": row["id"] in state.edits,
            "acceptable": row["id"] in state.excluded,
            "training_rank": training_rank.get(row["id"]),
        })
    return out


def _candidates_html(chosen: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>No dispreferred answers were generated for this sample.</em></p>"
    body = []
    for row in rows:
        similarity = "–" if row["similarity"] is None else f"{float(row['similarity']):.3f}"
        if row["acceptable"]:
            used = "acceptable (excluded)"
        elif row["training_rank"] is not None:
            used = f"#{row['training_rank']} in training"
        else:
            used = "not used"
        marks = " <span class='hscr-tag'>edited</span>" if row["edited"] else ""
        body.append(
            f"<tr data-candidate='{html.escape(row['id'])}' data-number='{row['number']}'>"
            f"<td>{row['number']}</td><td>{plots.word_diff_html(chosen, row['current_text'])}{marks}</td>"
            f"<td>{similarity}</td><td>{row['rank'] if row['rank'] is not None else '–'}</td>"
            f"<td>{row['num_replaced']}</td><td>{used}</td></tr>"
        )
    return (
        "<table class='hscr-candidates'><thead><tr><th>#</th><th>answer (changed words marked)</th>"
        "<th>similarity</th><th>rank</th><th>replaced</th><th>training use</th></tr></thead><tbody>"
        + "".join(body) + "</tbody></table>"
    )


def _history(reviews: list[dict[str, Any]], numbers: dict[str, int]) -> pd.DataFrame:
    rows = []
    for review in reviews:
        payload = json.loads(review.get("payload_json") or "{}")
        if "order" in payload:
            details = "order: " + ", ".join(f"#{numbers.get(cid, '?')}" for cid in payload["order"])
        else:
            details = payload.get("text", "")
        candidate = review.get("candidate_id")
        rows.append({
            "id": review["id"],
            "time (UTC)": str(review["created_at"])[:19],
            "user": review["user"],
            "action": review["action"],
            "answer": _history_target(review["action"], candidate, numbers),
            "details": details,
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _history_target(action: str, candidate_id: str | None, numbers: dict[str, int]) -> str:
    if candidate_id is not None:
        return f"#{numbers.get(candidate_id, '?')}"
    return "preferred" if action == "edit" else "–"


def review_view(context: AppContext, dataset: str, status: str, position: float) -> tuple[Any, ...]:
    """Show the queue item at ``position`` (1-based) with its answers, history and progress."""
    flt = _queue_filter(dataset, status)
    # One count per status serves both the queue length and the progress counter.
    all_counts = queries.count_samples(context.store, _queue_filter(dataset, ALL))
    total = all_counts[flt.status] if flt.status else all_counts["total"]
    position = min(max(int(position or 1), 1), max(total, 1))
    reviewed = all_counts["approved"] + all_counts["rejected"]
    progress = (
        f"Item **{position if total else 0} of {total}** in this queue · "
        f"**{reviewed} / {all_counts['total']}** generated samples reviewed "
        f"({all_counts['approved']} approved, {all_counts['rejected']} rejected)"
    )

    sample = queries.sample_at(context.store, flt, position - 1) if total else None
    if sample is None:
        empty = "<p><em>The queue is empty. Generate preference data or change the filters.</em></p>"
        return ("", position, progress, None, "", "", empty, gr.update(choices=[], value=None), "",
                pd.DataFrame(columns=HISTORY_COLUMNS), "")

    detail = queries.sample_detail(context.store, sample["id"])
    reviews = context.store.reviews_for(sample["id"])
    state = fold_reviews(reviews)
    candidates = context.store.candidates_for(sample["id"])
    rows = dispreferred(context, sample["id"], state, candidates)

    chosen = state.chosen_text or detail["answer"]
    # Words are marked against the answer the candidates were generated from, even after an edit.
    generated_from = next((c["text"] for c in candidates if c["num_replaced"] == 0), detail["answer"])
    numbers = {row["id"]: row["number"] for row in rows}
    order = ",".join(str(row["number"]) for row in sorted(
        (r for r in rows if r["training_rank"] is not None), key=lambda r: r["training_rank"]))

    info = (
        f"**Status: {state.status}** · {detail['dataset']} / {detail['split']} · "
        f"{detail.get('modality') or 'unknown modality'} · {detail['answer_type']} · "
        f"`{sample['id']}`" + (" · preferred answer edited" if state.chosen_text else "")
    )
    image = plots.display_size(open_stored(context.resolve_data_path(detail["image_path"])))
    choices = [(f"#{row['number']}: {row['current_text']}", row["id"]) for row in rows]
    return (
        sample["id"], position, progress, image, f"**Q:** {detail['question']}\n\n{info}", chosen,
        _candidates_html(generated_from, rows), gr.update(choices=choices, value=choices[0][1] if choices else None),
        order, _history(reviews, numbers), rows[0]["current_text"] if rows else "",
    )


def _record(context: AppContext, request: gr.Request | None, sample_id: str, action: str,
            candidate_id: str | None = None, payload: dict[str, Any] | None = None) -> None:
    if not sample_id:
        raise gr.Error("No sample is selected; the queue is empty.")
    user = user_name(context, request)
    try:
        review_id = record_review(context.store, user, sample_id, action, candidate_id, payload)
    except HSCRError as exc:
        logger.warning("review %s of sample %s by %s rejected: %s", action, sample_id, user, exc)
        raise gr.Error(str(exc)) from None
    logger.info("review %d: %s %s on sample %s", review_id, user, action, sample_id)


def save_chosen_edit(context: AppContext, sample_id: str, text: str, request: gr.Request) -> None:
    """Record an edit of the preferred answer."""
    _record(context, request, sample_id, "edit", None, {"text": text})


def save_candidate_edit(context: AppContext, sample_id: str, candidate_id: str, text: str, request: gr.Request) -> None:
    """Record an edit of one dispreferred answer."""
    if not candidate_id:
        raise gr.Error("Choose the dispreferred answer to edit.")
    _record(context, request, sample_id, "edit", candidate_id, {"text": text})


def toggle_acceptable(context: AppContext, sample_id: str, candidate_id: str, request: gr.Request) -> None:
    """Mark a dispreferred answer acceptable (excluded from training), or restore it."""
    if not candidate_id:
        raise gr.Error("Choose the dispreferred answer to mark.")
    state = review_state(context.store, sample_id)
    action = "restore" if candidate_id in state.excluded else "acceptable"
    _record(context, request, sample_id, action, candidate_id)


def rerank(context: AppContext, sample_id: str, order_text: str, request: gr.Request) -> None:
    """Record a new training order from answer numbers such as ``2,1,3`` (unlisted ones are not used)."""
    rows = dispreferred(context, sample_id, review_state(context.store, sample_id))
    by_number = {row["number"]: row["id"] for row in rows}
    try:
        numbers = [int(part.strip().lstrip("#")) for part in order_text.replace(" ", ",").split(",") if part.strip()]
    except ValueError:
        raise gr.Error(f"Invalid order {order_text!r}: list answer numbers separated by commas, for example 2,1,3.") from None
    unknown = [n for n in numbers if n not in by_number]
    if not numbers or unknown:
        raise gr.Error(
            f"Invalid order {order_text!r}: use numbers from 1 to {len(rows)}"
            + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else "")
        )
    _record(context, request, sample_id, "rerank", None, {"order": [by_number[n] for n in numbers]})


def set_status(context: AppContext, action: str, sample_id: str, status_filter: str, position: float,
               request: gr.Request) -> float:
    """Approve, reject or reopen the sample, then move to the next queue item."""
    _record(context, request, sample_id, action)
    # A status filter drops the sample from the queue, so the same position shows the next one.
    if status_filter in (None, "", ALL):
        return int(position or 1) + 1
    return int(position or 1)


def approve(context: AppContext, sample_id: str, status_filter: str, position: float, request: gr.Request) -> float:
    return set_status(context, "approve", sample_id, status_filter, position, request)


def reject(context: AppContext, sample_id: str, status_filter: str, position: float, request: gr.Request) -> float:
    return set_status(context, "reject", sample_id, status_filter, position, request)


def reopen(context: AppContext, sample_id: str, status_filter: str, position: float, request: gr.Request) -> float:
    return set_status(context, "reopen", sample_id, status_filter, position, request)


def add_note(context: AppContext, sample_id: str, text: str, request: gr.Request) -> str:
    """Record a note on the sample and clear the note box."""
    _record(context, request, sample_id, "note", None, {"text": text})
    return ""


def step(position: float, delta: int) -> int:
    return max(1, int(position or 1) + delta)


def next_position(position: float) -> int:
    return step(position, 1)


def previous_position(position: float) -> int:
    return step(position, -1)


def candidate_text(context: AppContext, sample_id: str, candidate_id: str) -> str:
    """Fill the edit box with the chosen dispreferred answer's current text."""
    if not sample_id or not candidate_id:
        return ""
    state = review_state(context.store, sample_id)
    for row in dispreferred(context, sample_id, state):
        if row["id"] == candidate_id:
            return row["current_text"]
    return ""


def start_generation(context: AppContext, dataset: str, split: str, limit: float | None,
                     dropout_ratio: float, beta: float) -> str:
    """Snapshot a split and start ``python -m hscr generate`` on it as a background job."""
    from hscr import jobs
    from hscr.config import GenerateConfig

    if dataset in (None, "", ALL):
        raise gr.Error("Choose the dataset to generate preference data for.")
    split = (split or "train").strip()
    try:
        GenerateConfig(dropout_ratio=float(dropout_ratio), beta=float(beta))
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    job_id = jobs.new_job_id("generate")
    run_dir = context.runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        db_path, count = snapshots.write_split_snapshot(context.store, run_dir, dataset, split)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    args = ["--model", context.model, "--db", str(db_path), "--dataset", dataset, "--split", split,
            "--set", f"dropout_ratio={float(dropout_ratio)}", "--set", f"beta={float(beta)}"]
    if limit and limit > 0:
        args += ["--limit", str(int(limit))]
    try:
        jobs.start_job("generate", args, runs_dir=context.runs_dir, job_id=job_id)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    logger.info("started generation job %s on %s/%s (%d samples)", job_id, dataset, split, count)
    return f"Started **{job_id}** on {dataset}/{split} ({min(count, int(limit)) if limit and limit > 0 else count} samples)."


def poll_generation(context: AppContext, dataset: str, status: str, position: float) -> tuple[Any, ...]:
    """Timer tick: ingest finished generation jobs; refresh the queue when new samples arrived."""
    from hscr import jobs

    copied = 0
    lines = []
    for job in jobs.list_jobs(context.runs_dir):
        if job["kind"] != "generate":
            continue
        if job["state"] == "succeeded":
            try:
                copied += snapshots.ingest_generation(context.store, Path(job["run_dir"]))
            except HSCRError as exc:
                logger.error("ingesting generation job %s failed: %s", job["id"], exc)
        if len(lines) < 3:
            fraction = job.get("progress")
            lines.append(f"- `{job['id']}`: {job['state']}" + (f", {fraction:.0%}" if fraction is not None else "")
                         + (f" ({job['error']})" if job.get("error") else ""))
    summary = "\n".join(lines) or "No generation jobs yet."
    if copied == 0:
        return (summary,) + (gr.skip(),) * 11
    return (summary, *review_view(context, dataset, status, position))


def build(context: AppContext) -> tuple[tuple[Any, list, list], gr.Button, gr.Textbox]:
    """Lay out the Review tab.

    Returns the page-load event (fn, inputs, outputs), the "Open in Inspect" button and the
    hidden box with the current sample id, which the layout wires to the Inspect tab.
    """
    datasets = queries.filter_choices(context.store)["dataset"]
    with gr.Accordion("Generate preference data", open=False):
        with gr.Row():
            g_dataset = gr.Dropdown(datasets, value=datasets[0] if datasets else None, label="Dataset",
                                    elem_id="generate-dataset")
            g_split = gr.Textbox(value="train", label="Split")
            g_limit = gr.Number(value=0, precision=0, label="Limit (0: every sample)")
            g_ratio = gr.Slider(0, 1, value=0.7, step=0.05, label="Dropout ratio")
            g_beta = gr.Slider(0, 5, value=0.9, step=0.1, label="Beta")
            g_start = gr.Button("Generate", variant="primary", elem_id="generate-start")
        g_message = gr.Markdown(elem_id="generate-message")
        g_jobs = gr.Markdown(elem_id="generate-jobs")
    with gr.Column(elem_id="review-panel"):
        with gr.Row():
            q_dataset = gr.Dropdown([ALL] + datasets, value=ALL, label="Dataset")
            q_status = gr.Dropdown([ALL, *queries.STATUSES], value="pending", label="Queue", elem_id="review-status")
            position = gr.Number(value=1, precision=0, minimum=1, label="Item", elem_id="review-position")
            prev_button = gr.Button("◀ Previous (k)", elem_id="review-prev")
            next_button = gr.Button("Next (j) ▶", elem_id="review-next")
        progress = gr.Markdown(elem_id="review-progress")
        sample_id = gr.Textbox(visible=False, elem_id="review-sample")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", interactive=False, label="Image", height=280)
                open_button = gr.Button("Open in Inspect", size="sm")
            with gr.Column(scale=3):
                info = gr.Markdown(elem_id="review-info")
                with gr.Row():
                    chosen = gr.Textbox(label="Preferred answer", elem_id="review-chosen", scale=5)
                    save_chosen = gr.Button("Save edit", elem_id="review-save-chosen", scale=1)
                candidates = gr.HTML(elem_id="review-candidates")
                with gr.Row():
                    candidate = gr.Dropdown(label="Dispreferred answer", choices=[], elem_id="review-candidate", scale=2)
                    candidate_box = gr.Textbox(label="Text", elem_id="review-candidate-text", scale=3)
                with gr.Row():
                    save_candidate = gr.Button("Save edit", elem_id="review-save-candidate")
                    acceptable = gr.Button("Acceptable / restore", elem_id="review-acceptable")
                with gr.Row():
                    order = gr.Textbox(label="Training order (answer numbers, least wrong first)",
                                       placeholder="2,1,3", elem_id="review-order", scale=3)
                    rerank_button = gr.Button("Re-rank", elem_id="review-rerank", scale=1)
                with gr.Row():
                    approve_button = gr.Button("Approve (a)", variant="primary", elem_id="review-approve")
                    reject_button = gr.Button("Reject (r)", variant="stop", elem_id="review-reject")
                    reopen_button = gr.Button("Reopen", elem_id="review-reopen")
                with gr.Row():
                    note = gr.Textbox(label="Note (n)", elem_id="review-note", scale=5)
                    note_button = gr.Button("Add note", elem_id="review-add-note", scale=1)
        gr.Markdown("#### History of this sample")
        history = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, wrap=True, elem_id="review-history")

    view = bind(review_view, context)
    view_inputs = [q_dataset, q_status, position]
    view_outputs = [sample_id, position, progress, image, info, chosen, candidates, candidate, order, history,
                    candidate_box]

    def refresh(event: Any) -> None:
        event.success(view, view_inputs, view_outputs)

    refresh(prev_button.click(previous_position, position, position))
    refresh(next_button.click(next_position, position, position))
    refresh(position.submit(lambda p: p, position, position))
    for control in (q_dataset, q_status):
        refresh(control.input(lambda: 1, None, position))
    refresh(save_chosen.click(bind(save_chosen_edit, context), [sample_id, chosen], None))
    refresh(save_candidate.click(bind(save_candidate_edit, context), [sample_id, candidate, candidate_box], None))
    refresh(acceptable.click(bind(toggle_acceptable, context), [sample_id, candidate], None))
    refresh(rerank_button.click(bind(rerank, context), [sample_id, order], None))
    status_inputs = [sample_id, q_status, position]
    refresh(approve_button.click(bind(approve, context), status_inputs, position))
    refresh(reject_button.click(bind(reject, context), status_inputs, position))
    refresh(reopen_button.click(bind(reopen, context), status_inputs, position))
    refresh(note_button.click(bind(add_note, context), [sample_id, note], note))
    candidate.input(bind(candidate_text, context), [sample_id, candidate], candidate_box)
    g_start.click(bind(start_generation, context), [g_dataset, g_split, g_limit, g_ratio, g_beta], g_message)
    gr.Timer(2.0).tick(bind(poll_generation, context), view_inputs, [g_jobs, *view_outputs], show_progress="hidden")
    return (view, view_inputs, view_outputs), open_button, sample_id
