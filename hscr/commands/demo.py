"""``python -m hscr demo [--force]``: build the demo model and import the demo datasets.

A second run finds what exists and returns in seconds. ``--force`` retrains the model from
scratch (deterministically) and re-imports the datasets.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_DATA_DIR = "data"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="build the offline demo: phantom dataset, demo model, pydicom slices"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the model and re-import the datasets")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"folder for the demo model (DIR/demo/model) (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--db", help="DuckDB file to import into (default DIR/hscr.duckdb)")
    parser.add_argument("--steps", type=int,
                        help="train exactly this many steps, without the lesion-accuracy check (default: the recipe's "
                             "3000 or more); fewer steps give a weaker model")
    parser.add_argument("--seed", type=int, help="seed of the model initialisation and batch order (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a field of the build recipe (hscr.demo.model.DemoRecipe), for example "
                             "--set train_images=400 (repeatable)")
    parser.add_argument("--no-dicom", action="store_true", help="skip the demo-dicom dataset")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from hscr.demo.build import check_data_dir, describe, ensure_demo
    from hscr.config import build_config
    from hscr.demo.recipe import DemoRecipe
    from hscr.errors import HSCRError

    values: dict[str, str | int] = {}
    for item in args.overrides:
        if "=" not in item:
            raise HSCRError(f"invalid --set {item!r}: expected name=value, for example train_images=400")
        name, raw = item.split("=", 1)
        values[name.strip()] = raw.strip()
    if args.steps is not None:
        values["steps"] = values["max_steps"] = args.steps
    if args.seed is not None:
        values["seed"] = args.seed
    recipe = build_config(DemoRecipe, values)
    result = ensure_demo(check_data_dir(args.data_dir), progress=True, force=args.force, db_path=args.db,
                         recipe=recipe, import_dicom=not args.no_dicom)
    print(describe(result))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
