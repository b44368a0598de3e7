"""Command line of ``python app.py``: parse options, prepare the data folder, launch the UI."""

from __future__ import annotations

import argparse
import logging


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Start the HSCR Studio app.")
    parser.add_argument("--model", help="model path or hub id (default: the demo model)")
    parser.add_argument("--db", default="data/hscr.duckdb", help="DuckDB file (default data/hscr.duckdb)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import gradio as gr

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with gr.Blocks(title="HSCR Studio") as demo:
        gr.Markdown("# HSCR Studio\nThe app is being built; use `python -m hscr --help` meanwhile.")
    demo.launch(server_name=args.host, server_port=args.port, share=False)
    return 0
