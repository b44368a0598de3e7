"""Compare tab: base and trained answers side by side, metric tables and charts, evaluation jobs.

An evaluation runs as a job on a snapshot of the chosen split (see :mod:`app.snapshots`); a timer
copies finished jobs' predictions into the database, after which they appear here.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import plots, queries, snapshots
from app.state import AppContext, bind
from hscr import jobs
from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

BASE_MODEL = "base model"
METRIC_COLUMNS = ["dataset", "split", "model", "paper_open_recall", "paper_closed_accuracy",
                  "strict_open_recall", "strict_closed_accuracy", "open_count", "closed_count", "eval_run_id"]
METRICS = ["strict_closed_accuracy", "strict_open_recall", "paper_closed_accuracy", "paper_open_recall"]
SAMPLE_COLUMNS = ["sample_id", "outcome", "answer_type", "question", "answer", "base", "trained",
                  "base score", "trained score"]
OUTCOMES = ["all", "fixed", "broken", "unchanged"]


def _run_label(run: dict[str, Any]) -> str:
    who = "trained " + Path(run["adapter"]).parent.name if run.get("adapter") else "base"
    return f"{run['dataset']}/{run['split']} · {who} · {run['id']}"


def adapters(context: AppContext) -> list[tuple[str, str]]:
    """Return the adapters of finished training runs as (label, path) pairs, plus the base model."""
    found = [(BASE_MODEL, "")]
    for job in jobs.list_jobs(context.runs_dir):
        adapter = Path(job["run_dir"]) / "adapter"
        if job["kind"] == "train" and adapter.is_dir():
            found.append((f"{job['id']} ({job['state']})", str(adapter)))
    return found


def ingest_finished(context: AppContext) -> int:
    """Copy the predictions of finished evaluation jobs into the database; returns rows copied."""
    copied = 0
    for job in jobs.list_jobs(context.runs_dir):
        if job["kind"] == "evaluate" and job["state"] == "succeeded":
            try:
                copied += snapshots.ingest_evaluation(context.store, Path(job["run_dir"]))
            except HSCRError as exc:
                logger.error("ingesting evaluation job %s failed: %s", job["id"], exc)
    return copied


def metrics_view(context: AppContext, metric: str) -> tuple[pd.DataFrame, Any, Any, Any]:
    """Return the metric table of every evaluation run, its bar chart and the run choices."""
    from hscr.evaluate import list_eval_runs, metrics_table

    runs = list_eval_runs(context.store)
    table = metrics_table(context.store, [run["id"] for run in runs]) if runs else []
    for row in table:
        row["model"] = "trained " + Path(row["adapter"]).parent.name if row.get("adapter") else "base"
    frame = pd.DataFrame(table, columns=METRIC_COLUMNS)
    figure = plots.metrics_bar_figure(table, metric) if table else None
    choices = [(_run_label(run), run["id"]) for run in runs]
    base_runs = [c for c, run in zip(choices, runs) if not run.get("adapter")]
    trained_runs = [c for c, run in zip(choices, runs) if run.get("adapter")]
    return (
        frame,
        figure,
        gr.update(choices=choices, value=base_runs[0][1] if base_runs else None),
        gr.update(choices=choices, value=trained_runs[0][1] if trained_runs else None),
    )


def refresh(context: AppContext, metric: str) -> tuple[Any, ...]:
    """Ingest finished evaluation jobs, then rebuild the tables (page load and metric choice)."""
    ingest_finished(context)
    return (*metrics_view(context, metric), jobs_summary(context))


def poll(context: AppContext, metric: str) -> tuple[Any, ...]:
    """Timer tick: ingest finished evaluation jobs and rebuild the tables only when rows arrived."""
    if ingest_finished(context) == 0:
        return (gr.skip(),) * 4 + (jobs_summary(context),)
    return (*metrics_view(context, metric), jobs_summary(context))


def jobs_summary(context: AppContext) -> str:
    active = [job for job in jobs.list_jobs(context.runs_dir) if job["kind"] == "evaluate"][:5]
    if not active:
        return "No evaluation jobs yet."
    lines = []
    for job in active:
        fraction = job.get("progress")
        lines.append(f"- `{job['id']}`: {job['state']}" + (f", {fraction:.0%}" if fraction is not None else "")
                     + (f" ({job['error']})" if job.get("error") else ""))
    return "\n".join(lines)


def start_evaluation(context: AppContext, dataset: str, split: str, adapter: str, limit: float | None) -> str:
    """Snapshot the split into a run folder and start ``python -m hscr evaluate`` on it."""
    if not dataset:
        raise gr.Error("Choose the dataset to evaluate.")
    split = (split or "test").strip()
    job_id = jobs.new_job_id("evaluate")
    run_dir = context.runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        db_path, count = snapshots.write_split_snapshot(context.store, run_dir, dataset, split)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    args = ["--model", context.model, "--db", str(db_path), "--dataset", dataset, "--split", split]
    if adapter:
        args += ["--adapter", adapter]
    if limit and limit < 0:
        raise gr.Error(f"Invalid limit {limit}: use 0 for every sample or a positive number.")
    if limit:
        args += ["--limit", str(int(limit))]
    try:
        jobs.start_job("evaluate", args, runs_dir=context.runs_dir, job_id=job_id)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    logger.info("started evaluation job %s on %s/%s (%d samples)", job_id, dataset, split, count)
    return f"Started **{job_id}**: {dataset}/{split}, {min(count, int(limit)) if limit else count} samples."


def compare_samples(context: AppContext, base_run: str, trained_run: str, outcome: str) -> tuple[pd.DataFrame, str]:
    """List the samples both runs answered, filtered to fixed, broken or unchanged ones."""
    from hscr.compare import compare_runs

    if not base_run or not trained_run:
        return pd.DataFrame(columns=SAMPLE_COLUMNS), "Choose a base run and a trained run."
    try:
        result = compare_runs(context.store, base_run, trained_run)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    rows = [
        {"sample_id": s["sample_id"], "outcome": s["outcome"], "answer_type": s["answer_type"],
         "question": s["question"], "answer": s["answer"], "base": s["base_text"], "trained": s["other_text"],
         "base score": round(float(s["base_score"]), 3), "trained score": round(float(s["other_score"]), 3)}
        for s in result["samples"] if outcome in (None, "", "all") or s["outcome"] == outcome
    ]
    counts = result["counts"]["all"]
    mcnemar = result["mcnemar"]
    summary = (
        f"{counts['fixed']} fixed, {counts['broken']} broken, {counts['unchanged']} unchanged (strict protocol). "
        f"McNemar on closed questions: b={mcnemar['b']}, c={mcnemar['c']}, p={mcnemar['p_value']:.3g}."
    )
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS), summary


def side_by_side(table: pd.DataFrame, event: gr.SelectData) -> tuple[str, str]:
    """Show the clicked sample's base and trained answers with the changed words marked."""
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    record = table.iloc[int(row)]
    base, trained = str(record["base"]), str(record["trained"])
    view = (
        "<table class='hscr-candidates'><tr><th>question</th><td>" + html.escape(str(record["question"])) + "</td></tr>"
        "<tr><th>reference</th><td>" + html.escape(str(record["answer"])) + "</td></tr>"
        f"<tr><th>base ({record['base score']})</th><td>{plots.word_diff_html(trained, base)}</td></tr>"
        f"<tr><th>trained ({record['trained score']})</th><td>{plots.word_diff_html(base, trained)}</td></tr></table>"
    )
    return view, str(record["sample_id"])


def build(context: AppContext) -> tuple[tuple[Any, list, list], gr.Button, gr.Textbox]:
    """Lay out the Compare tab.

    Returns the page-load event (fn, inputs, outputs), the "Open in Inspect" button and the box
    with the selected sample id, which the layout wires to the Inspect tab.
    """
    datasets = queries.filter_choices(context.store)["dataset"]
    gr.Markdown("### Metrics per dataset")
    metric = gr.Dropdown(METRICS, value=METRICS[0], label="Metric for the chart", elem_id="compare-metric")
    with gr.Row():
        metrics_table = gr.Dataframe(headers=METRIC_COLUMNS, interactive=False, elem_id="compare-metrics", scale=3)
        chart = gr.Plot(label="Metric by dataset", elem_id="compare-chart", scale=2)
    with gr.Accordion("Start an evaluation", open=False):
        with gr.Row():
            eval_dataset = gr.Dropdown(datasets, value=datasets[0] if datasets else None, label="Dataset",
                                       elem_id="eval-dataset")
            eval_split = gr.Textbox(value="test", label="Split", elem_id="eval-split")
            eval_adapter = gr.Dropdown(adapters(context), value="", label="Model", elem_id="eval-adapter")
            eval_limit = gr.Number(value=0, precision=0, label="Limit (0: every sample)", elem_id="eval-limit")
            eval_start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        eval_message = gr.Markdown(elem_id="eval-message")
        eval_jobs = gr.Markdown(elem_id="eval-jobs")
    gr.Markdown("### Answers side by side")
    with gr.Row():
        base_run = gr.Dropdown([], label="Base run", elem_id="compare-base")
        trained_run = gr.Dropdown([], label="Trained run", elem_id="compare-trained")
        outcome = gr.Radio(OUTCOMES, value="all", label="Show", elem_id="compare-outcome")
    summary = gr.Markdown(elem_id="compare-summary")
    samples = gr.Dataframe(headers=SAMPLE_COLUMNS, interactive=False, wrap=True, elem_id="compare-samples")
    detail = gr.HTML(elem_id="compare-detail")
    with gr.Row():
        selected = gr.Textbox(label="Selected sample", interactive=False, elem_id="compare-sample")
        open_button = gr.Button("Open in Inspect", elem_id="compare-open")

    refresh_outputs = [metrics_table, chart, base_run, trained_run, eval_jobs]
    refresh_handler = bind(refresh, context)
    compare_handler = bind(compare_samples, context)
    metric.input(refresh_handler, metric, refresh_outputs)
    eval_start.click(bind(start_evaluation, context), [eval_dataset, eval_split, eval_adapter, eval_limit], eval_message)
    eval_adapter.focus(lambda: gr.update(choices=adapters(context)), None, eval_adapter)
    for control in (base_run, trained_run, outcome):
        control.change(compare_handler, [base_run, trained_run, outcome], [samples, summary])
    samples.select(side_by_side, samples, [detail, selected])
    gr.Timer(2.0).tick(bind(poll, context), metric, refresh_outputs, show_progress="hidden")
    return (refresh_handler, [metric], refresh_outputs), open_button, selected
