"""``python -m hscr score``: score LLaVA-Med answer files against reference answers.

    python -m hscr score --predictions answers.jsonl --references test.json --json
"""

from __future__ import annotations

import argparse
import json
import sys

MAX_LISTED_IDS = 10


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="score a LLaVA-Med answer file (JSONL) against references under both protocols"
    )
    parser.add_argument("--predictions", required=True, metavar="PRED.jsonl",
                        help="answers as JSON lines {question_id, text}")
    parser.add_argument("--references", required=True, metavar="GT",
                        help="LLaVA-Med evaluation JSON array (conversations) or JSONL {question_id, answer, answer_type}")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON on the last line")
    parser.set_defaults(handler=main)


def _id_list(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED_IDS])
    return shown + (f", ... ({len(ids) - MAX_LISTED_IDS} more)" if len(ids) > MAX_LISTED_IDS else "")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(args: argparse.Namespace) -> int:
    from hscr.evaluate import score_files

    scores = score_files(args.predictions, args.references)
    if scores.missing_predictions:
        print(f"warning: {len(scores.missing_predictions)} references have no prediction: {_id_list(scores.missing_predictions)}",
              file=sys.stderr)
    if scores.missing_references:
        print(f"warning: {len(scores.missing_references)} predictions have no reference: {_id_list(scores.missing_references)}",
              file=sys.stderr)
    summary = scores.summary
    counts = summary["counts"]
    print(f"scored {counts['open']} open and {counts['closed']} closed questions")
    print(f"{'protocol':<10}{'open recall':>14}{'closed accuracy':>18}")
    for protocol in ("paper", "strict"):
        values = summary[protocol]
        print(f"{protocol:<10}{_percent(values['open_recall']):>14}{_percent(values['closed_accuracy']):>18}")
    if args.json:
        print(json.dumps(summary))
    return 0
