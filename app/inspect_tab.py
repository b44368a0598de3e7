"""Inspect tab: the image (zoom, DICOM window/level), the answers, coloured tokens and patch heatmaps.

The token view runs the method on one sample with the model cached in the app process; the
patch heatmap for every answer token is computed right after it, in one batched occlusion
pass, and kept in the session so choosing another token costs no model call.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd
from PIL import Image

from app import plots, queries
from hscr.pixels import load_window_pixels
from app.state import AppContext, bind
from hscr.config import GenerateConfig
from hscr.errors import HSCRError
from hscr.images import WINDOW_PRESETS, full_range_window, open_stored, render_window

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = "default"
FULL_RANGE = "full range"
CANDIDATE_COLUMNS = ["rank", "text", "replaced", "similarity", "kept"]


def _sample(context: AppContext, sample_id: str) -> dict[str, Any]:
    sample_id = (sample_id or "").strip()
    if not sample_id:
        raise gr.Error("Enter a sample id, or click a sample in the Data tab.")
    row = queries.sample_detail(context.store, sample_id)
    if row is None:
        raise gr.Error(f"Sample {sample_id!r} not found in {context.store.db_path}.")
    return row


def _image_path(context: AppContext, sample: dict[str, Any]) -> Path:
    return context.resolve_data_path(sample["image_path"])


def render_image(
    context: AppContext,
    sample_id: str,
    preset: str,
    center: float,
    width: float,
    invert: bool,
    zoom: float,
    pan_x: float,
    pan_y: float,
    heatmap: Any = None,
) -> Image.Image:
    """Render the sample's image with the chosen window, optional heatmap overlay and zoom."""
    sample = _sample(context, sample_id)
    path = _image_path(context, sample)
    windowed = load_window_pixels(path, sample.get("source_format") or "dicom")
    if windowed is not None:
        image = render_window(windowed, center, width, invert).convert("RGB")
    else:
        image = open_stored(path)
        if invert:
            image = Image.eval(image, lambda value: 255 - value)
    image = plots.display_size(image)
    if heatmap is not None:
        image = plots.heatmap_overlay(image, heatmap)
    return plots.zoom_image(image, float(zoom), float(pan_x), float(pan_y))


def load_sample(context: AppContext, sample_id: str) -> tuple[Any, ...]:
    """Show a sample's texts and set the window controls for its image."""
    sample = _sample(context, sample_id)
    windowed = load_window_pixels(_image_path(context, sample), sample.get("source_format") or "dicom")
    if windowed is None:
        window_group = gr.update(visible=False)
        center = gr.update(value=128)
        width = gr.update(value=256)
        preset = gr.update(value=DEFAULT_WINDOW)
    else:
        low, high = float(windowed.pixels.min()), float(windowed.pixels.max())
        full_center, full_width = full_range_window(windowed.pixels)
        default_center = windowed.window_center if windowed.window_center is not None else full_center
        default_width = windowed.window_width if windowed.window_width is not None else full_width
        span = max(high - low, 1.0)
        window_group = gr.update(visible=True)
        center = gr.update(minimum=low - span, maximum=high + span, value=default_center)
        width = gr.update(minimum=1, maximum=2 * span + 1, value=default_width)
        preset = gr.update(value=DEFAULT_WINDOW)
    header = (
        f"**{sample['dataset']}** / {sample['split']} · {sample.get('modality') or 'unknown modality'} · "
        f"{sample['answer_type']} question · source {sample.get('source_format') or '?'}"
    )
    if windowed is None and (sample.get("source_format") or "").lower() == "dicom":
        # Databases imported before pixels were kept beside the PNG have only the rendered image.
        header += (" · window/level unavailable: this DICOM was imported without its pixel values; "
                   "import or upload the file again to re-window it")
    stored_answer = queries.model_answer(context.store, sample["id"]) or ""
    return header, sample["question"], sample["answer"], stored_answer, window_group, preset, center, width


def apply_preset(context: AppContext, sample_id: str, preset: str) -> tuple[Any, Any]:
    """Move the center and width sliders to a window preset."""
    if preset in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[preset]
        return gr.update(value=center), gr.update(value=width)
    sample = _sample(context, sample_id)
    windowed = load_window_pixels(_image_path(context, sample))
    if windowed is None:
        return gr.update(), gr.update()
    full_center, full_width = full_range_window(windowed.pixels)
    if preset == DEFAULT_WINDOW and windowed.window_center is not None and windowed.window_width is not None:
        return gr.update(value=windowed.window_center), gr.update(value=windowed.window_width)
    return gr.update(value=full_center), gr.update(value=full_width)


def analyze(
    context: AppContext, sample_id: str, answer: str, dropout_ratio: float, beta: float, num_coupled: float
) -> tuple[str, pd.DataFrame, Any, dict[str, Any], str]:
    """Score every answer token of the sample with the cached model (the token view)."""
    from hscr.generate import analyze_sample

    sample = _sample(context, sample_id)
    answer = (answer or "").strip() or sample["answer"]
    started = time.perf_counter()
    try:
        config = GenerateConfig(dropout_ratio=float(dropout_ratio), beta=float(beta),
                                num_coupled_tokens=int(num_coupled))
        vlm = context.models.get(context.model)
        image = open_stored(_image_path(context, sample))
        result = analyze_sample(vlm, image, sample["question"], answer, config)
    except HSCRError as exc:
        logger.error("token view of sample %s failed: %s", sample["id"], exc)
        raise gr.Error(str(exc)) from None
    elapsed = time.perf_counter() - started

    tokens = with_display_text(vlm.tokenizer, result["tokens"])
    candidates = pd.DataFrame(
        [
            {"rank": c.get("rank"), "text": c["text"], "replaced": c.get("num_replaced"),
             "similarity": None if c.get("similarity") is None else round(float(c["similarity"]), 3),
             "kept": bool(c.get("kept"))}
            for c in result["candidates"]
        ],
        columns=CANDIDATE_COLUMNS,
    )
    choices = [(f"{t['position']}: {plots.display_text(t).strip() or t['token']} (s={float(t['score']):+.2f})",
                int(t["position"])) for t in tokens]
    coupled = [t for t in tokens if t.get("coupled")]
    default = max(coupled or tokens, key=lambda t: float(t["score"]))["position"] if tokens else None
    state = {"sample_id": sample["id"], "answer": answer, "tokens": tokens}
    timing = f"token view: {elapsed:.2f} s on {vlm.device}"
    logger.info("token view of sample %s took %.3f s", sample["id"], elapsed)
    return (
        plots.tokens_html(tokens, float(dropout_ratio)),
        candidates,
        gr.update(choices=choices, value=default),
        state,
        timing,
    )


def own_answer(context: AppContext, sample_id: str, stored: str) -> str:
    """Return the model's greedy answer: the stored one from generation, else decoded now."""
    from hscr.decoding import greedy_generate

    if stored and stored.strip():
        return stored
    sample = _sample(context, sample_id)
    vlm = context.models.get(context.model)
    image = open_stored(_image_path(context, sample))
    try:
        return greedy_generate(vlm, [image], [sample["question"]], max_new_tokens=32)[0]
    except HSCRError as exc:
        logger.error("greedy answer of sample %s failed: %s", sample["id"], exc)
        raise gr.Error(str(exc)) from None


def with_display_text(tokenizer: Any, tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each token's ``text`` to the characters it adds to the decoded answer, spaces included.

    Decoding token by token drops the word-initial space of SentencePiece and word-level
    tokenizers, so the answer would read run together; decoding growing prefixes keeps it.
    """
    ids = tokenizer.convert_tokens_to_ids([t["token"] for t in tokens])
    special = set(tokenizer.all_special_ids)
    out, previous = [], ""
    for index, token in enumerate(tokens):
        if ids[index] in special:
            out.append({**token, "text": token["token"]})
            continue
        decoded = tokenizer.decode([i for i in ids[: index + 1] if i not in special])
        piece = decoded[len(previous):] if decoded.startswith(previous) else " " + decoded.split()[-1]
        previous = decoded
        out.append({**token, "text": piece if index else piece.lstrip()})
    return out


def compute_occlusion(context: AppContext, analysis: dict[str, Any] | None, window: float) -> dict[str, Any] | None:
    """Occlude the image patch by patch and keep the importance of every patch for every token."""
    from hscr.occlusion import occlusion_map

    if not analysis:
        return analysis
    sample = _sample(context, analysis["sample_id"])
    vlm = context.models.get(context.model)
    image = open_stored(_image_path(context, sample))
    started = time.perf_counter()
    result = occlusion_map(vlm, image, sample["question"], analysis["answer"], window=int(window))
    logger.info("occlusion of sample %s (%d patches) took %.3f s", sample["id"], result.scores.shape[1],
                time.perf_counter() - started)
    return {**analysis, "occlusion": result.scores.tolist(), "side": result.side}


def show_heatmap(
    context: AppContext,
    analysis: dict[str, Any] | None,
    token_position: Any,
    preset: str,
    center: float,
    width: float,
    invert: bool,
    zoom: float,
    pan_x: float,
    pan_y: float,
) -> tuple[Any, str]:
    """Overlay the chosen token's patch importance on the image."""
    import numpy as np

    if not analysis or "occlusion" not in analysis or token_position is None:
        return None, "Analyze the sample and choose a token to see its heatmap."
    scores = np.asarray(analysis["occlusion"], dtype=np.float32)
    position = int(token_position)
    if not 0 <= position < scores.shape[0]:
        raise gr.Error(f"Token {position} is not in this answer; choose a token from the list.")
    grid = scores[position].reshape(analysis["side"], analysis["side"])
    image = render_image(context, analysis["sample_id"], preset, center, width, invert, zoom, pan_x, pan_y, heatmap=grid)
    token = analysis["tokens"][position]
    caption = (
        f"Token {position} {plots.display_text(token).strip()!r}: red patches lower its log-prob when occluded "
        f"(up to {float(grid.max()):.3f} nats), blue patches raise it (down to {float(grid.min()):.3f} nats)."
    )
    return image, caption


def build(context: AppContext) -> tuple[gr.Textbox, Callable[[Any], None]]:
    """Lay out the Inspect tab.

    Returns the sample id box, which other tabs fill, and ``open_sample(event)``, which chains
    loading and analysing that sample after another tab's event.
    """
    with gr.Row():
        sample_id = gr.Textbox(label="Sample id", elem_id="inspect-sample", scale=4)
        load_button = gr.Button("Load", elem_id="inspect-load", scale=1)
    header = gr.Markdown(elem_id="inspect-header")
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Image", type="pil", interactive=False, elem_id="inspect-image", height=360)
            with gr.Row():
                zoom = gr.Slider(1, 8, value=1, step=0.5, label="Zoom")
                pan_x = gr.Slider(0, 1, value=0.5, step=0.05, label="Centre x")
                pan_y = gr.Slider(0, 1, value=0.5, step=0.05, label="Centre y")
            with gr.Group(visible=False) as window_group:
                preset = gr.Dropdown([DEFAULT_WINDOW, FULL_RANGE, *WINDOW_PRESETS], value=DEFAULT_WINDOW,
                                     label="Window preset", elem_id="window-preset")
                center = gr.Slider(-2000, 4000, value=40, step=1, label="Window center (level)")
                width = gr.Slider(1, 6000, value=400, step=1, label="Window width")
            invert = gr.Checkbox(label="Invert", value=False)
        with gr.Column(scale=1):
            question = gr.Textbox(label="Question", interactive=False)
            reference = gr.Textbox(label="Reference answer (the answer scored and coloured below)", interactive=True, elem_id="inspect-answer")
            own = gr.Textbox(label="Model's own answer (greedy, full image)", interactive=False,
                             elem_id="inspect-own-answer")
            with gr.Row():
                dropout_ratio = gr.Slider(0, 1, value=0.7, step=0.05, label="Dropout ratio")
                beta = gr.Slider(0, 5, value=0.9, step=0.1, label="Beta")
                num_coupled = gr.Slider(1, 20, value=10, step=1, label="Top-n coupled tokens")
            analyze_button = gr.Button("Analyze tokens", variant="primary", elem_id="inspect-analyze")
            timing = gr.Markdown(elem_id="inspect-timing")
            tokens = gr.HTML(elem_id="inspect-tokens")
    with gr.Row():
        with gr.Column(scale=1):
            token_choice = gr.Dropdown(label="Token for the heatmap", choices=[], elem_id="heatmap-token")
            occlusion_window = gr.Slider(1, 4, value=1, step=1, label="Occlusion window (patches per side)")
            heatmap = gr.Image(label="Patch heatmap", type="pil", interactive=False, elem_id="inspect-heatmap", height=360)
            heatmap_caption = gr.Markdown(elem_id="heatmap-caption")
        with gr.Column(scale=1):
            candidates = gr.Dataframe(headers=CANDIDATE_COLUMNS, interactive=False, wrap=True,
                                      label="Reference answer (rank 0) and its dispreferred answers from this analysis")
    analysis = gr.State(None)

    view_inputs = [sample_id, preset, center, width, invert, zoom, pan_x, pan_y]
    render = bind(render_image, context)
    heatmap_inputs = [analysis, token_choice, preset, center, width, invert, zoom, pan_x, pan_y]
    heatmap_handler = bind(show_heatmap, context)
    analyze_handler = bind(analyze, context)
    analyze_inputs = [sample_id, reference, dropout_ratio, beta, num_coupled]
    analyze_outputs = [tokens, candidates, token_choice, analysis, timing]
    occlusion = bind(compute_occlusion, context)

    def chain_analysis(event: Any) -> Any:
        return event.then(analyze_handler, analyze_inputs, analyze_outputs).then(
            occlusion, [analysis, occlusion_window], analysis
        ).then(heatmap_handler, heatmap_inputs, [heatmap, heatmap_caption])

    load_handler = bind(load_sample, context)
    load_outputs = [header, question, reference, own, window_group, preset, center, width]

    def open_sample(event: Any) -> None:
        """Chain loading, rendering and analysing the sample in ``sample_id`` after ``event``."""
        loaded = event.then(load_handler, [sample_id], load_outputs).then(render, view_inputs, image)
        chain_analysis(loaded).then(bind(own_answer, context), [sample_id, own], own)

    open_sample(load_button.click(lambda: None, None, None))
    open_sample(sample_id.submit(lambda: None, None, None))
    chain_analysis(analyze_button.click(lambda: None, None, None))
    occlusion_window.release(occlusion, [analysis, occlusion_window], analysis).then(
        heatmap_handler, heatmap_inputs, [heatmap, heatmap_caption]
    )
    preset.input(bind(apply_preset, context), [sample_id, preset], [center, width]).then(render, view_inputs, image)
    for control in (center, width, zoom, pan_x, pan_y):
        control.release(render, view_inputs, image).then(heatmap_handler, heatmap_inputs, [heatmap, heatmap_caption])
    invert.input(render, view_inputs, image).then(heatmap_handler, heatmap_inputs, [heatmap, heatmap_caption])
    token_choice.input(heatmap_handler, heatmap_inputs, [heatmap, heatmap_caption])
    return sample_id, open_sample


def warm_up(context: AppContext) -> None:
    """Load the model and the sentence embedder and run one analysis, so the first token view is fast."""
    from hscr.generate import analyze_sample

    started = time.perf_counter()
    try:
        vlm = context.models.get(context.model)
        analyze_sample(vlm, Image.new("RGB", (64, 64)), "is there a lesion ?", "yes", GenerateConfig())
    except HSCRError as exc:
        logger.error("warm-up of model %s failed: %s", context.model, exc)
        return
    logger.info("model %s ready for the token view after %.1f s", context.model, time.perf_counter() - started)
