"""Command-line entry point: ``python -m hscr <command> ...``.

Each command lives in ``hscr/commands/<name>.py`` with ``register(subparsers)`` and
``main(args) -> int``; this module only dispatches. Bad input raises ``HSCRError``, which is
printed as one ``error:`` line with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from hscr.errors import HSCRError

# Module names under hscr.commands, in the order `--help` lists them.
COMMANDS = [
    "demo",
    "import_data",
    "generate",
    "train",
    "evaluate",
    "score",
    "export",
    "jobs",
    "convert",
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hscr",
        description="HSCR Studio: build preference data from a medical VLM's own image dependence and train on it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hscr.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hscr.commands.{name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.handler(args) or 0)
    except HSCRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
