"""``python -m hscr generate``: build ranked preference data for a dataset in the database."""

from __future__ import annotations

import argparse
import json

from hscr.commands import DEFAULT_DB, add_model_arguments, check_limit
from hscr.config import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate graded dispreferred answers and store them ranked")
    add_model_arguments(parser)
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    parser.add_argument("--dataset", help="dataset name (default: all samples)")
    parser.add_argument("--split", help="split to use (default: all)")
    parser.add_argument("--limit", type=int, help="process at most this many samples")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    add_config_arguments(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from hscr.config import GenerateConfig, load_config
    from hscr.generate import run_generation
    from hscr.models import load_vlm
    from hscr.rerank import get_embedder
    from hscr.store import Store

    config = load_config(GenerateConfig, args.config, args.overrides)
    check_limit(args.limit)
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    get_embedder(config.embedder)  # fail on a bad embedder before any work
    with Store(args.db) as store:
        summary = run_generation(vlm, store, config, dataset=args.dataset, split=args.split, limit=args.limit)
    for message in summary["errors"]:
        print(f"error: {message}")
    print(
        f"run {summary['run_id']}: {summary['processed']} samples processed, {summary['skipped']} already done, "
        f"{summary['flagged']} flagged (fewer than two kept dispreferred answers), {len(summary['errors'])} errors"
    )
    if args.json:
        print(json.dumps(summary))
    return 1 if summary["errors"] else 0
