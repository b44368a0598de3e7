"""``python -m hscr evaluate``: answer a dataset split with greedy decoding and score it.

    python -m hscr evaluate --model data/demo/model --db data/hscr.duckdb --dataset demo --split test
    python -m hscr evaluate --model data/demo/model --adapter data/runs/train-1/adapter --db data/hscr.duckdb --dataset demo
"""

from __future__ import annotations

import argparse
import json
import time

from hscr.commands import DEFAULT_DB, add_model_arguments, check_limit
from hscr.config import add_config_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="answer a dataset split greedily, store and score the answers")
    add_model_arguments(parser)
    parser.add_argument("--adapter", help="folder of a LoRA adapter saved by training (default: the base model)")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    parser.add_argument("--dataset", required=True, help="dataset name in the database")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many samples")
    parser.add_argument("--output", metavar="ANSWERS.jsonl",
                        help="answer file in LLaVA-Med's format (default <data>/runs/<run id>/answers.jsonl)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    add_config_arguments(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hscr import jobs
    from hscr.config import EvalConfig, load_config
    from hscr.evaluate import check_adapter_path, format_table, load_adapter, metrics_table, run_evaluation
    from hscr.models import load_vlm
    from hscr.store import Store

    config = load_config(EvalConfig, args.config, args.overrides)
    check_limit(args.limit)
    if args.adapter:
        check_adapter_path(args.adapter)  # fail before the slow model load
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    if args.adapter:
        vlm = load_adapter(vlm, args.adapter)
    bar = tqdm(desc="evaluate", unit="sample")
    started = time.monotonic()

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        elapsed = time.monotonic() - started
        jobs.report_progress(
            fraction=done / total if total else 1.0,
            step=done,
            total=total,
            eta_s=elapsed / done * (total - done) if done else None,
            message=f"{done}/{total} samples answered",
        )

    try:
        with Store(args.db) as store:
            summary = run_evaluation(
                vlm, store, args.dataset, split=args.split, limit=args.limit, adapter_name=args.adapter,
                progress=on_progress, config=config, answers_path=args.output,
            )
            table = metrics_table(store, [summary["eval_run_id"]])
    finally:
        bar.close()
    for message in summary["errors"]:
        print(f"error: {message}")
    print(
        f"evaluation {summary['eval_run_id']}: {summary['processed']} samples answered, "
        f"{summary['skipped']} already answered, {len(summary['errors'])} errors"
    )
    print(format_table(table))
    print(f"answers: {summary['answers']}")
    print(f"references: {summary['references']}")
    if args.json:
        print(json.dumps({**summary, "model": args.model, "adapter": args.adapter, "dataset": args.dataset,
                          "split": args.split}))
    return 1 if summary["errors"] else 0
