"""Subcommands of ``python -m hscr``; each module has ``register(subparsers)`` that sets ``handler``.

This package also holds the options that several commands share.
"""

from __future__ import annotations

import argparse

from hscr.errors import HSCRError

DEFAULT_DB = "data/hscr.duckdb"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--device`` and ``--dtype`` for commands that load a VLM."""
    parser.add_argument("--model", required=True, help="model folder or hub id (Hugging Face format)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")


def check_limit(limit: int | None) -> None:
    """Reject a ``--limit`` below 1 with the value in the message."""
    if limit is not None and limit < 1:
        raise HSCRError(f"invalid --limit {limit}: expected a positive integer")
