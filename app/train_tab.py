"""Train tab: presets, a config form, one-click background training with live curves.

Training runs as a job (``python -m hscr train``) in ``<data>/runs/<job id>/``; the app writes
the preference rows there as Parquet first, so the job never opens the database. The page polls
the job with a ``gr.Timer``. Everything it shows is read from the run folder, so the view is the
same after a browser reload or an app restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import plots, queries
from app.state import AppContext, bind
from hscr import jobs
from hscr.config import TrainConfig, build_config
from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

TRAIN_FIELDS = [f for f in dataclasses.fields(TrainConfig)]
ALL = "(all)"
RUN_COLUMNS = ["job", "state", "created (UTC)", "step", "loss", "margin", "accuracy", "adapter"]

# Values that differ from TrainConfig's defaults; "paper defaults" uses TrainConfig as it is.
PRESETS: dict[str, dict[str, Any]] = {
    "paper defaults": {},
    "demo model on CPU": {"learning_rate": 5e-4, "batch_size": 8, "lora_r": 8, "lora_alpha": 16,
                          "save_steps": 10, "bf16": False},
    "smoke test (4 steps)": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "lora_r": 4,
                             "lora_alpha": 8, "save_steps": 2, "bf16": False},
}


def device_summary() -> str:
    """Describe the compute device and, on CUDA, its free memory."""
    import torch

    if not torch.cuda.is_available():
        return "Device: **CPU** (no CUDA device found)."
    parts = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        parts.append(f"cuda:{index} {torch.cuda.get_device_name(index)}: "
                     f"**{free / 2**30:.1f} GiB free** of {total / 2**30:.1f} GiB")
    return "Device: " + "; ".join(parts)


def _uses_gpu(args: list[str]) -> bool:
    import torch

    device = "auto"
    if "--device" in args and args.index("--device") + 1 < len(args):
        device = args[args.index("--device") + 1]
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def busy_gpu_job(context: AppContext) -> dict[str, Any] | None:
    """Return an active job that uses the GPU, if any."""
    for job in jobs.list_jobs(context.runs_dir):
        if job["state"] in jobs.ACTIVE_STATES and _uses_gpu([str(a) for a in job.get("args") or []]):
            return job
    return None


def preset_values(preset: str) -> list[Any]:
    """Return the form values of a preset, in the order of TrainConfig's fields."""
    if preset not in PRESETS:
        raise gr.Error(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    defaults = dataclasses.asdict(TrainConfig())
    defaults.update(PRESETS[preset])
    return [defaults[f.name] for f in TRAIN_FIELDS]


def _config_from_form(values: tuple[Any, ...]) -> TrainConfig:
    form = {}
    for config_field, value in zip(TRAIN_FIELDS, values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise gr.Error(f"The setting {config_field.name} is empty; fill it in or pick a preset.")
        form[config_field.name] = value
    try:
        return build_config(TrainConfig, form)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None


def start_training(
    context: AppContext, dataset: str, split: str, reviewed_only: bool, device: str, *form: Any
) -> tuple[Any, str]:
    """Snapshot the preference data into a new run folder and start the training job."""
    from hscr.preferences import preferences_summary, load_preferences, write_preferences_parquet

    config = _config_from_form(form)
    if _uses_gpu(["--device", device]):
        busy = busy_gpu_job(context)
        if busy is not None:
            raise gr.Error(
                f"The GPU is busy with job {busy['id']} ({busy['kind']}, {busy['state']}). "
                "Wait for it to finish or cancel it, or start this run on device cpu."
            )
    rows = load_preferences(
        context.store, reviewed_only=bool(reviewed_only),
        dataset=None if dataset in (None, "", ALL) else dataset,
        split=None if split in (None, "", ALL) else split,
    )
    if not rows:
        raise gr.Error(
            "No preference data matches: generate candidates first (python -m hscr generate), "
            + ("approve samples in the Review tab, " if reviewed_only else "")
            + "or widen the dataset and split."
        )
    job_id = jobs.new_job_id("train")
    run_dir = context.runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=False)
    data_path = write_preferences_parquet(rows, run_dir / "preferences.parquet")
    config_path = run_dir / "train_config.json"
    config_path.write_text(json.dumps({"train": dataclasses.asdict(config)}, indent=2), encoding="utf-8")
    (run_dir / "app_request.json").write_text(json.dumps({
        "model": context.model, "dataset": dataset, "split": split, "reviewed_only": bool(reviewed_only),
        "rows": len(rows), "summary": preferences_summary(rows),
    }, indent=2, default=str), encoding="utf-8")
    args = ["--model", context.model, "--data", str(data_path), "--output", str(run_dir),
            "--config", str(config_path), "--device", device or "auto"]
    try:
        jobs.start_job("train", args, runs_dir=context.runs_dir, job_id=job_id)
    except HSCRError as exc:
        logger.error("starting training job %s failed: %s", job_id, exc)
        raise gr.Error(str(exc)) from None
    logger.info("started training job %s on %d preference rows", job_id, len(rows))
    return gr.update(choices=_train_job_ids(context), value=job_id), f"Started **{job_id}** on {len(rows)} samples."


def _train_job_ids(context: AppContext) -> list[str]:
    return [job["id"] for job in jobs.list_jobs(context.runs_dir) if job["kind"] == "train"]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl``, skipping a last line that is still being written."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def job_view(context: AppContext, job_id: str | None) -> tuple[str, Any, str, str]:
    """Return the job's status line, its training curves, the log tail and the device line."""
    if not job_id:
        return "No training run yet. Pick a preset and press **Start training**.", None, "", device_summary()
    try:
        info = jobs.status(job_id, context.runs_dir)
    except HSCRError as exc:
        return f"Run {job_id} cannot be read: {exc}", None, "", device_summary()
    detail = info.get("progress_detail") or {}
    fraction = info.get("progress") or 0.0
    step = detail.get("step")
    total = detail.get("total")
    lines = [
        f"**{job_id}** · state **{info['state']}**"
        + (f" · step {step}/{total}" if step is not None and total else "")
        + f" · {fraction:.0%} · ETA {_format_eta(info.get('eta_s'))}",
        f"<progress class='hscr-progress' max='1' value='{fraction:.4f}' style='width:100%'></progress>",
    ]
    if info.get("error"):
        lines.append(f"<span class='hscr-warning'>{info['error']}</span>")
    if info["state"] in ("cancelled", "failed"):
        lines.append("Press **Resume** to continue from the last checkpoint.")
    adapter = Path(info["run_dir"]) / "adapter"
    if info["state"] == "succeeded" and adapter.is_dir():
        lines.append(f"Adapter: `{adapter}`")
    metrics = read_metrics(Path(info["run_dir"]))
    figure = plots.training_figure(metrics) if metrics else None
    return "\n\n".join(lines), figure, "\n".join(info.get("log_tail") or []), device_summary()


def runs_table(context: AppContext) -> pd.DataFrame:
    """Return one row per training run, newest first."""
    rows = []
    for job in jobs.list_jobs(context.runs_dir):
        if job["kind"] != "train":
            continue
        metrics = read_metrics(Path(job["run_dir"]))
        last = metrics[-1] if metrics else {}
        adapter = Path(job["run_dir"]) / "adapter"
        rows.append({
            "job": job["id"], "state": job["state"], "created (UTC)": (job.get("created_at") or "")[:19],
            "step": last.get("step"), "loss": _round(last.get("loss")),
            "margin": _round(last.get("rewards/margins")), "accuracy": _round(last.get("rewards/accuracies")),
            "adapter": str(adapter) if adapter.is_dir() else "",
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _round(value: Any) -> Any:
    return None if value is None else round(float(value), 4)


def _signature(context: AppContext, job_id: str | None) -> str:
    """Summarize what the view shows of a run: status file, metrics and log sizes."""
    if not job_id:
        return ""
    run_dir = context.runs_dir / job_id
    parts = [job_id]
    for name in ("status.json", "metrics.jsonl", "log.txt"):
        path = run_dir / name
        parts.append(f"{path.stat().st_mtime_ns}:{path.stat().st_size}" if path.exists() else "-")
    return "|".join(parts)


def poll(context: AppContext, job_id: str | None, seen: str) -> tuple[Any, ...]:
    """Timer tick: refresh the selected run's view when its files changed since the last tick."""
    signature = _signature(context, job_id)
    if signature == seen:
        return (gr.skip(),) * 5
    return (*job_view(context, job_id), signature)


def cancel_job(context: AppContext, job_id: str | None) -> str:
    """Stop the run's process tree; training saves a checkpoint on the way out."""
    if not job_id:
        raise gr.Error("Choose the run to cancel.")
    try:
        info = jobs.cancel(job_id, context.runs_dir)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    logger.info("cancel requested for training job %s", job_id)
    if info["state"] not in jobs.ACTIVE_STATES and not info.get("cancel_requested"):
        return f"Run {job_id} already ended ({info['state']})."
    return f"Cancelling **{job_id}**: the run saves a checkpoint and stops."


def resume_job(context: AppContext, job_id: str | None, device: str) -> str:
    """Start a stopped run again from its latest checkpoint, with the same data and settings."""
    if not job_id:
        raise gr.Error("Choose the run to resume.")
    info = jobs.status(job_id, context.runs_dir)
    if info["state"] in jobs.ACTIVE_STATES:
        raise gr.Error(f"Run {job_id} is still {info['state']}; there is nothing to resume.")
    if info["state"] == "succeeded":
        raise gr.Error(f"Run {job_id} finished; start a new run to train further.")
    args = [str(a) for a in info.get("args") or []]
    if "--device" in args:
        at = args.index("--device")
        args[at + 1] = device or args[at + 1]
    if _uses_gpu(args):
        busy = busy_gpu_job(context)
        if busy is not None:
            raise gr.Error(f"The GPU is busy with job {busy['id']}; wait for it or resume on device cpu.")
    if "--resume" not in args:
        args.append("--resume")
    try:
        jobs.start_job("train", args, runs_dir=context.runs_dir, job_id=job_id)
    except HSCRError as exc:
        raise gr.Error(str(exc)) from None
    logger.info("resumed training job %s", job_id)
    return f"Resumed **{job_id}** from its latest checkpoint."


def initial_view(context: AppContext) -> tuple[Any, ...]:
    """On page load: list the runs and select the active one, else the newest."""
    runs = [job for job in jobs.list_jobs(context.runs_dir) if job["kind"] == "train"]
    active = [job for job in runs if job["state"] in jobs.ACTIVE_STATES]
    selected = (active or runs)[0]["id"] if runs else None
    choices = queries.filter_choices(context.store)
    return (
        gr.update(choices=[job["id"] for job in runs], value=selected),
        gr.update(choices=[ALL] + choices["dataset"]),
        runs_table(context),
        *job_view(context, selected),
    )


def _field_component(config_field: dataclasses.Field, value: Any) -> gr.components.Component:
    info = config_field.metadata.get("help", "")
    label = config_field.name
    elem_id = f"train-{config_field.name.replace('_', '-')}"
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id)
    if isinstance(value, int):
        return gr.Number(value=value, label=label, info=info, precision=0, elem_id=elem_id)
    if isinstance(value, float):
        return gr.Number(value=value, label=label, info=info, elem_id=elem_id)
    return gr.Textbox(value=str(value), label=label, info=info, elem_id=elem_id)


def build(context: AppContext) -> tuple[Any, list, list]:
    """Lay out the Train tab; returns the page-load event (fn, inputs, outputs)."""
    device_line = gr.Markdown(elem_id="train-device")
    with gr.Row():
        dataset = gr.Dropdown([ALL], value=ALL, label="Dataset", elem_id="train-dataset")
        split = gr.Textbox(value="train", label="Split ('(all)' for every split)")
        reviewed_only = gr.Checkbox(value=False, label="Approved samples only")
        device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", elem_id="train-device-choice")
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS), value="paper defaults", label="Preset", elem_id="train-preset")
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
    defaults = dataclasses.asdict(TrainConfig())
    with gr.Accordion("Settings", open=False):
        form = []
        for start_index in range(0, len(TRAIN_FIELDS), 4):
            with gr.Row():
                for config_field in TRAIN_FIELDS[start_index : start_index + 4]:
                    form.append(_field_component(config_field, defaults[config_field.name]))
    gr.Markdown("### Run")
    with gr.Row():
        job = gr.Dropdown([], label="Training run", elem_id="train-job", scale=3)
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel", scale=1)
        resume = gr.Button("Resume", elem_id="train-resume", scale=1)
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    curves = gr.Plot(label="Training curves", elem_id="train-curves")
    log_tail = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False, elem_id="train-log")
    gr.Markdown("### Past runs")
    table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, elem_id="train-runs")
    timer = gr.Timer(1.0)
    seen = gr.State("")

    view_outputs = [status, curves, log_tail, device_line]
    preset.input(preset_values, preset, form)
    start.click(bind(start_training, context), [dataset, split, reviewed_only, device, *form], [job, message]).success(
        bind(job_view, context), job, view_outputs
    )
    job.input(bind(job_view, context), job, view_outputs)
    cancel.click(bind(cancel_job, context), job, message)
    resume.click(bind(resume_job, context), [job, device], message)
    timer.tick(bind(poll, context), [job, seen], [*view_outputs, seen], show_progress="hidden")
    gr.Timer(5.0).tick(bind(runs_table, context), None, table, show_progress="hidden")
    return bind(initial_view, context), [], [job, dataset, table, *view_outputs]
