"""``python -m hscr import FORMAT PATH --db DB``: import a dataset into the database."""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from hscr.datasets import FORMATS
from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

DEFAULT_DB = "data/hscr.duckdb"


def register(subparsers) -> None:
    parser = subparsers.add_parser("import", help="import a dataset (folder, vqa-rad, slake, pathvqa, llava-med)")
    parser.add_argument("format", metavar="FORMAT", help=f"dataset format: {', '.join(FORMATS)}")
    parser.add_argument("path", metavar="PATH", help="dataset folder or file")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    parser.add_argument("--name", help="dataset name in the database (default: from the format or folder)")
    parser.add_argument("--split", default="train", help="split for rows without one (default train)")
    parser.add_argument("--lang", default="en", choices=["en", "zh", "all"], help="question language to keep (default en)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from hscr.datasets.common import ImportOptions
    from hscr.store import Store

    if args.format not in FORMATS:
        raise HSCRError(f"unknown dataset format {args.format!r}; supported: {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[args.format])
    options = ImportOptions(name=args.name, split=args.split, lang=args.lang)
    with Store(args.db) as store:
        report = module.import_path(store, Path(args.path), options)
    for message in report.warnings:
        logger.warning(message)
    for message in report.errors:
        logger.error(message)
    total = sum(report.imported.values())
    print(
        f"imported {total} samples into {report.dataset!r} "
        f"({', '.join(f'{k}: {v}' for k, v in report.imported.items()) or 'none new'}); "
        f"{report.duplicates} duplicates, {report.skipped} skipped, {len(report.errors)} errors"
    )
    if args.json:
        print(report.to_json())
    return 0 if report.ok else 1
