"""``python -m hscr import FORMAT PATH --db DB``: import a dataset into the database.

Prints one ``warning:``/``error:`` line per problem on stderr and a summary; with ``--json`` the
last line on stdout is the report as JSON. Exits 1 when any row failed, 2 when nothing could be
imported (wrong format, unreadable file).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from hscr.datasets import FORMATS
from hscr.datasets.common import unreadable_json
from hscr.errors import HSCRError
from hscr.commands import DEFAULT_DB


EPILOG = """layouts inside PATH are detected:
  vqa-rad    'VQA_RAD Dataset Public.json' (OSF), trainset.json/testset.json (MEVF), data/*.parquet (Hugging Face)
  slake      train.json, validate.json or validation.json, test.json, imgs/ or imgs.zip
  pathvqa    qas/<split>/<split>_qa.pkl + images/<split>/ (original), data/*.parquet (Hugging Face)
  llava-med  instruction or ground-truth JSON (conversations/conversatons), question JSONL, or a folder of them
  folder     samples.csv (image,question,answer[,answer_type,split,lang,id,frame]) beside the images

PathVQA pickles are loaded only from the PATH given here, and only plain lists, dicts, strings
and numbers are accepted; never import pickles someone else uploaded."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a dataset (vqa-rad, slake, pathvqa, llava-med, folder)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", metavar="FORMAT", help=f"dataset format: {', '.join(FORMATS)}")
    parser.add_argument("path", metavar="PATH", type=Path, help="dataset folder or file")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    parser.add_argument("--name", help="dataset name in the database (default: the format, or the folder name for folder)")
    parser.add_argument("--split", default="train", help="split for folder rows without a split column (default train)")
    parser.add_argument(
        "--lang", choices=["en", "zh", "all"],
        help="question language to import: en, zh or all (default en for slake, all for the others)",
    )
    parser.add_argument("--images", type=Path, help="folder the image names are relative to (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(handler=main)


def check_layout(fmt: str, path: Path) -> str:
    """Return the layout ``fmt`` finds at ``path``, or raise naming the format that fits instead."""
    if fmt not in FORMATS:
        raise HSCRError(f"unknown dataset format {fmt!r}; supported: {', '.join(FORMATS)}")
    if not path.exists():
        raise HSCRError(f"{fmt} dataset path not found: {path}")
    module = importlib.import_module(FORMATS[fmt])
    layout = module.detect(path)
    if layout is not None:
        return layout
    others = [name for name, module_name in FORMATS.items()
              if name != fmt and importlib.import_module(module_name).detect(path) is not None]
    hint = f" It looks like {' or '.join(others)}: run `python -m hscr import {others[0]} {path}`." if others else ""
    problems = "".join(f" {problem}." for problem in unreadable_json(path))
    raise HSCRError(f"{path} is not a {fmt} dataset: expected {module.EXPECTED}.{problems}{hint}")


def main(args: argparse.Namespace) -> int:
    try:
        report = _run(args)
    except HSCRError as exc:
        if not args.json:
            raise
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"imported": {}, "duplicates": 0, "skipped": 0, "warnings": [], "errors": [str(exc)]}))
        return 2

    for message in report.warnings:
        print(f"warning: {message}", file=sys.stderr)
    for message in report.errors:
        print(f"error: {message}", file=sys.stderr)
    total = sum(report.imported.values())
    counts = ", ".join(f"{split}: {count}" for split, count in report.imported.items()) or "none new"
    print(
        f"imported {total} samples into {report.dataset!r} ({counts}); {report.duplicates} duplicates, "
        f"{report.skipped} skipped, {report.filtered} in other languages, {len(report.errors)} errors"
    )
    if args.json:
        print(report.to_json())
    return 0 if report.ok else 1


def _run(args: argparse.Namespace):
    from hscr.datasets.common import ImportOptions
    from hscr.store import Store

    check_layout(args.format, args.path)
    module = importlib.import_module(FORMATS[args.format])
    options = ImportOptions(
        name=args.name, split=args.split, lang=args.lang, image_root=args.images,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    with Store(args.db) as store:
        return module.import_path(store, args.path, options)
