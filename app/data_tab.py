"""Data tab: import datasets, upload images and DICOM files, browse samples with filters."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import queries
from hscr.pixels import save_window_pixels
from app.state import AppContext, bind
from hscr.commands.import_data import check_layout
from hscr.datasets import FORMATS
from hscr.datasets.common import ImportOptions, ImportReport, infer_answer_type
from hscr.errors import HSCRError
from hscr.images import load_any

logger = logging.getLogger(__name__)

PAGE_SIZE = 25
BROWSE_COLUMNS = ["id", "dataset", "split", "modality", "answer_type", "status", "question", "answer"]
ALL = "(all)"


def _report_markdown(report: ImportReport) -> str:
    total = sum(report.imported.values())
    splits = ", ".join(f"{split}: {n}" for split, n in report.imported.items()) or "none new"
    lines = [f"**{report.dataset}**: imported {total} samples ({splits}); "
             f"{report.duplicates} duplicates, {report.skipped} skipped."]
    lines += [f"- warning: {message}" for message in report.warnings[:20]]
    lines += [f"- error: {message}" for message in report.errors[:20]]
    if len(report.errors) > 20:
        lines.append(f"- ... and {len(report.errors) - 20} more errors")
    return "\n".join(lines)


def import_dataset(context: AppContext, fmt: str, path: str, name: str, split: str) -> str:
    """Import a dataset from a folder or file on the app's machine."""
    if fmt not in FORMATS:
        raise gr.Error(f"Unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if not path or not path.strip():
        raise gr.Error("Enter the path of the dataset folder or file on this machine.")
    module = importlib.import_module(FORMATS[fmt])
    options = ImportOptions(name=name.strip() or None, split=split.strip() or "train")
    try:
        # The layout check names unreadable JSON files and the format that fits instead.
        check_layout(fmt, Path(path.strip()).expanduser())
        report = module.import_path(context.store, Path(path.strip()).expanduser(), options)
    except HSCRError as exc:
        logger.error("import of %s from %s failed: %s", fmt, path, exc)
        raise gr.Error(str(exc)) from None
    logger.info("imported %s from %s: %s", fmt, path, report.imported)
    return _report_markdown(report)


def _store_upload(context: AppContext, file_path: Path) -> tuple[str, str | None]:
    """Store one uploaded image or DICOM; returns its image id and modality."""
    loaded = load_any(file_path)
    image_id = context.store.add_image(
        loaded.png_bytes(), loaded.image.width, loaded.image.height,
        modality=loaded.modality, source_format=loaded.source_format, meta=loaded.meta,
    )
    try:
        save_window_pixels(context.store.image_path(image_id), loaded)
    except OSError as exc:
        raise HSCRError(f"cannot write the pixel values of {file_path.name}: {exc.strerror}; free disk space "
                        f"in {context.data_dir} and upload again") from None
    return image_id, loaded.modality


def upload_files(
    context: AppContext,
    files: list[str] | None,
    dataset: str,
    split: str,
    question: str,
    answer: str,
) -> str:
    """Store uploaded images and DICOM files, or import them as a folder when a samples.csv is among them.

    Without a samples.csv, each image becomes one sample with the given question and answer.
    """
    if not files:
        raise gr.Error("Choose one or more image, DICOM or samples.csv files to upload.")
    paths = [Path(f) for f in files]
    try:
        return _import_uploads(context, paths, dataset, split, question, answer)
    finally:
        remove_uploads(paths)


def remove_uploads(paths: list[Path]) -> None:
    """Delete uploaded files from Gradio's cache once they are imported.

    The raw uploads still carry every DICOM tag (patient name, ids, institution); only the
    de-identified image that the store keeps may stay on disk.
    """
    cache = os.environ.get("GRADIO_TEMP_DIR")
    if not cache:
        return
    root = Path(cache).resolve()
    for path in paths:
        resolved = path.resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            continue
        try:
            resolved.unlink(missing_ok=True)
            if resolved.parent != root and not any(resolved.parent.iterdir()):
                resolved.parent.rmdir()
        except OSError as exc:
            logger.warning("could not remove the upload %s from the cache: %s", resolved.name, exc.strerror)


def _import_uploads(context: AppContext, paths: list[Path], dataset: str, split: str, question: str, answer: str) -> str:
    dataset = dataset.strip() or "uploads"
    split = split.strip() or "train"
    csv_files = [p for p in paths if p.name.lower().endswith(".csv")]
    if csv_files:
        return _import_uploaded_folder(context, paths, csv_files[0], dataset, split)

    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        raise gr.Error("Enter the question and the reference answer for the uploaded images, or upload a samples.csv with them.")
    report = ImportReport(dataset=dataset)
    for path in paths:
        try:
            image_id, _ = _store_upload(context, path)
            _, inserted = context.store.add_sample(
                dataset, split, image_id, question, answer, infer_answer_type(answer), source_id=path.name,
            )
        except HSCRError as exc:
            logger.error("upload of %s failed: %s", path.name, exc)
            report.errors.append(f"{path.name}: {exc}")
            report.skipped += 1
            continue
        if inserted:
            report.count(split)
        else:
            report.duplicates += 1
    return _report_markdown(report)


def _import_uploaded_folder(context: AppContext, paths: list[Path], csv_path: Path, dataset: str, split: str) -> str:
    module = importlib.import_module(FORMATS["folder"])
    with tempfile.TemporaryDirectory(prefix="hscr-upload-") as folder:
        root = Path(folder)
        for path in paths:
            target = root / ("samples.csv" if path == csv_path else path.name)
            shutil.copyfile(path, target)
        try:
            report = module.import_path(context.store, root, ImportOptions(name=dataset, split=split))
        except HSCRError as exc:
            logger.error("upload import of %s failed: %s", csv_path.name, exc)
            raise gr.Error(str(exc)) from None
    return _report_markdown(report)


@dataclass
class BrowseView:
    """One page of the sample browser."""

    table: pd.DataFrame
    counts: str
    page_label: str


def _filter(dataset: str, split: str, modality: str, answer_type: str, status: str) -> queries.SampleFilter:
    def value(choice: str | None) -> str | None:
        return None if choice in (None, "", ALL) else choice

    return queries.SampleFilter(
        dataset=value(dataset), split=value(split), modality=value(modality),
        answer_type=value(answer_type), status=value(status),
    )


def browse(
    context: AppContext, dataset: str, split: str, modality: str, answer_type: str, status: str, page: float
) -> tuple[pd.DataFrame, str, int]:
    """Return one page of samples matching the filters, the counts and the clamped page number."""
    flt = _filter(dataset, split, modality, answer_type, status)
    counts = queries.count_samples(context.store, flt)
    pages = max(1, -(-counts["total"] // PAGE_SIZE))
    page = min(max(int(page or 1), 1), pages)
    rows = queries.list_samples(context.store, flt, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    table = pd.DataFrame(rows, columns=BROWSE_COLUMNS)
    summary = (
        f"**{counts['total']}** samples match: {counts['pending']} pending, {counts['approved']} approved, "
        f"{counts['rejected']} rejected. Page {page} of {pages}."
    )
    return table, summary, page


def refresh_filters(context: AppContext) -> tuple[Any, ...]:
    """Refill the filter dropdowns from the database (after an import)."""
    choices = queries.filter_choices(context.store)
    return tuple(
        gr.update(choices=[ALL] + choices[key]) for key in ("dataset", "split", "modality", "answer_type")
    )


def select_sample(table: pd.DataFrame, event: gr.SelectData) -> tuple[str, Any]:
    """Open the clicked sample in the Inspect tab."""
    row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
    sample_id = str(table.iloc[int(row)]["id"])
    return sample_id, gr.Tabs(selected="inspect")


def build(context: AppContext) -> tuple[tuple[Any, list, list], gr.Dataframe]:
    """Lay out the Data tab inside the current ``gr.Tab``.

    Returns the page-load event (fn, inputs, outputs) and the sample table, whose row clicks
    the layout sends to the Inspect tab.
    """
    choices = queries.filter_choices(context.store)
    gr.Markdown("### Samples")
    with gr.Row():
        f_dataset = gr.Dropdown([ALL] + choices["dataset"], value=ALL, label="Dataset", elem_id="filter-dataset")
        f_split = gr.Dropdown([ALL] + choices["split"], value=ALL, label="Split", elem_id="filter-split")
        f_modality = gr.Dropdown([ALL] + choices["modality"], value=ALL, label="Modality", elem_id="filter-modality")
        f_type = gr.Dropdown([ALL] + choices["answer_type"], value=ALL, label="Answer type", elem_id="filter-type")
        f_status = gr.Dropdown([ALL, *queries.STATUSES], value=ALL, label="Review status", elem_id="filter-status")
        page = gr.Number(value=1, label="Page", precision=0, minimum=1, elem_id="browse-page")
    counts = gr.Markdown(elem_id="browse-counts")
    table = gr.Dataframe(
        headers=BROWSE_COLUMNS, interactive=False, wrap=True, elem_id="browse-table",
        column_widths=["14%", "9%", "7%", "8%", "8%", "8%", "26%", "20%"],
    )
    gr.Markdown("Click a row to open the sample in the Inspect tab.")

    with gr.Accordion("Import and upload", open=not choices["dataset"]):
        with gr.Row():
            with gr.Column():
                gr.Markdown("#### Import a dataset\nA folder or file on this machine, in one of the supported formats.")
                fmt = gr.Dropdown(list(FORMATS), value="folder", label="Format", elem_id="import-format")
                path = gr.Textbox(label="Path on this machine", placeholder="/data/vqa_rad", elem_id="import-path")
                with gr.Row():
                    name = gr.Textbox(label="Dataset name (optional)", elem_id="import-name")
                    split = gr.Textbox(label="Default split", value="train")
                import_button = gr.Button("Import", variant="primary", elem_id="import-button")
            with gr.Column():
                gr.Markdown(
                    "#### Upload images\nPNG, JPEG, TIFF or DICOM files. Upload a `samples.csv` "
                    "(image,question,answer) with them, or give one question and answer for all."
                )
                files = gr.File(file_count="multiple", label="Files", type="filepath", elem_id="upload-files")
                with gr.Row():
                    up_dataset = gr.Textbox(label="Dataset", value="uploads")
                    up_split = gr.Textbox(label="Split", value="train")
                with gr.Row():
                    up_question = gr.Textbox(label="Question", elem_id="upload-question")
                    up_answer = gr.Textbox(label="Reference answer", elem_id="upload-answer")
                upload_button = gr.Button("Upload", elem_id="upload-button")
        report = gr.Markdown(elem_id="import-report")

    filters = [f_dataset, f_split, f_modality, f_type, f_status]
    browse_handler = bind(browse, context)
    browse_inputs = filters + [page]
    browse_outputs = [table, counts, page]
    refresh = bind(refresh_filters, context)

    import_button.click(bind(import_dataset, context), [fmt, path, name, split], report).then(
        refresh, None, filters[:4]
    ).then(browse_handler, browse_inputs, browse_outputs)
    upload_button.click(
        bind(upload_files, context), [files, up_dataset, up_split, up_question, up_answer], report
    ).then(refresh, None, filters[:4]).then(browse_handler, browse_inputs, browse_outputs)
    for control in filters:
        control.change(browse_handler, browse_inputs, browse_outputs)
    page.submit(browse_handler, browse_inputs, browse_outputs)
    return (browse_handler, browse_inputs, browse_outputs), table
