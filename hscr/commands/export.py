"""``python -m hscr export``: write the reviewed preference data as Parquet for other trainers.

    python -m hscr export --db data/hscr.duckdb --format trl --output prefs.parquet --reviewed-only
"""

from __future__ import annotations

import argparse
import json

from hscr.export import FORMATS
from hscr.commands import DEFAULT_DB



def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export preference data (TRL, listwise or RLAIF-V Parquet)")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="trl: one chosen/rejected pair per row as TRL messages; listwise: one sample per row "
                             "with the ranked rejected list; rlaif-v: plain-string pairs like RLAIF-V")
    parser.add_argument("--output", required=True, metavar="PATH.parquet", help="Parquet file to write")
    parser.add_argument("--reviewed-only", action="store_true", help="export approved samples only")
    parser.add_argument("--dataset", help="export one dataset (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from hscr.export import export
    from hscr.store import Store

    with Store(args.db, read_only=True) as store:
        summary = export(store, args.fmt, args.output, reviewed_only=args.reviewed_only, dataset=args.dataset)
    print(f"wrote {summary['rows']} rows from {summary['samples']} samples to {summary['output']} ({summary['format']} format)")
    if args.json:
        print(json.dumps(summary))
    return 0
