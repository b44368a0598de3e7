"""The app's page: a header and one tab per task, wired to the handlers of each tab module."""

from __future__ import annotations

import gradio as gr

from app import compare_tab, data_tab, inspect_tab, review_tab, train_tab
from app.state import AppContext, bind, user_name

CSS = """
.hscr-tokens { font-size: 1.15rem; line-height: 2.2rem; }
.hscr-token { display: inline-block; padding: 0 1px; border-radius: 3px; cursor: help; white-space: pre; }
.hscr-coupled { text-decoration: underline 2px; font-weight: 600; }
.hscr-token sup { font-size: 0.65rem; margin-left: 1px; }
.hscr-legend { margin-top: 0.6rem; max-width: 520px; font-size: 0.8rem; }
.hscr-legend-bar { height: 12px; border: 1px solid #999; border-radius: 2px; }
.hscr-legend-ticks { display: flex; justify-content: space-between; text-align: center; }
.hscr-note { font-size: 0.8rem; opacity: 0.8; }
mark.hscr-diff { background: #ffd54f; padding: 0 2px; border-radius: 2px; }
.hscr-candidates td, .hscr-candidates th { padding: 4px 8px; vertical-align: top; }
.hscr-tag { font-size: 0.7rem; background: #e0e0e0; border-radius: 3px; padding: 0 4px; }
.hscr-warning { color: #b71c1c; font-weight: 600; }
"""


def header_text(context: AppContext, request: gr.Request) -> str:
    """Return the header line: who is logged in, which model and database the app uses."""
    user = user_name(context, request)
    return f"**HSCR Studio** · user **{user}** · model `{context.model}` · database `{context.store.db_path}`"


def open_in_inspect(sample_id: str) -> tuple[str, gr.Tabs]:
    """Put a sample id into the Inspect tab and switch to it."""
    return sample_id, gr.Tabs(selected="inspect")


def build_app(context: AppContext) -> gr.Blocks:
    """Build the whole page; every handler gets ``context`` bound as its first argument."""
    with gr.Blocks(title="HSCR Studio", analytics_enabled=False) as demo:
        header = gr.Markdown(elem_id="app-header")
        with gr.Tabs(elem_id="main-tabs") as tabs:
            with gr.Tab("Data", id="data", elem_id="tab-data"):
                data_load, sample_table = data_tab.build(context)
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
                inspect_sample, open_sample = inspect_tab.build(context)
            with gr.Tab("Review", id="review", elem_id="tab-review"):
                review_load, review_open, review_sample = review_tab.build(context)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_load = train_tab.build(context)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                compare_load, compare_open, compare_sample = compare_tab.build(context)

        open_sample(sample_table.select(data_tab.select_sample, [sample_table], [inspect_sample, tabs]))
        open_sample(review_open.click(open_in_inspect, review_sample, [inspect_sample, tabs]))
        open_sample(compare_open.click(open_in_inspect, compare_sample, [inspect_sample, tabs]))

        demo.load(bind(header_text, context), None, header)
        for handler, inputs, outputs in (data_load, review_load, train_load, compare_load):
            demo.load(handler, inputs, outputs)
        demo.load(None, None, None, js=review_tab.SHORTCUTS_JS)
    return demo
