"""``python -m hscr train``: MLPO training with LoRA from the database or a Parquet snapshot.

    python -m hscr train --model data/demo/model --db data/hscr.duckdb --output data/runs/t1
    accelerate launch --multi_gpu --num_processes 4 -m hscr train --model ... --data prefs.parquet --output ...

With ``--db`` the preference rows are read once and written to ``<output>/preferences.parquet``;
training reads only that snapshot, and ``--resume`` reuses it, so the data order stays the same.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hscr.config import TrainConfig, add_config_arguments, load_config
from hscr.errors import DataError, HSCRError

logger = logging.getLogger(__name__)

SNAPSHOT = "preferences.parquet"


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train LoRA adapters with MLPO on the preference data")
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help="base model folder or hub id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--db", help="DuckDB file to read the preference data from (snapshotted to the output)")
    source.add_argument("--data", metavar="PARQUET", help="preference rows written by hscr.preferences")
    parser.add_argument("--output", required=True, metavar="DIR", help="run folder for metrics, checkpoints and the adapter")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--reviewed-only", action="store_true", help="with --db: only samples a reviewer approved")
    parser.add_argument("--dataset", help="with --db: only this dataset")
    parser.add_argument("--split", default="train", help="with --db: only this split ('all' for every split; default train)")
    parser.add_argument("--run-id", help="with --db: candidates of this generation run (default: each sample's latest)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under accelerate launch: set by the launcher)")
    add_config_arguments(parser)
    parser.set_defaults(handler=main)


def _read_snapshot(path: Path) -> list:
    from hscr.preferences import read_preferences_parquet

    if not path.is_file():
        raise DataError(f"preference file not found: {path}")
    try:
        return read_preferences_parquet(path)
    except (OSError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read preference rows from {path}: {exc}") from None


def _snapshot_rows(args: argparse.Namespace, output: Path, accelerator) -> list:
    """Write ``<output>/preferences.parquet`` once (main process) and read it in every process."""
    from hscr.preferences import load_preferences, write_preferences_parquet

    snapshot = output / SNAPSHOT
    if args.resume and snapshot.is_file():
        logger.info("resuming with the data snapshot %s", snapshot)
    elif accelerator.is_main_process:
        if args.data:
            rows = _read_snapshot(Path(args.data))
            if Path(args.data).resolve() != snapshot.resolve():
                write_preferences_parquet(rows, snapshot)
        elif args.db:
            from hscr.store import Store

            with Store(args.db, read_only=True) as store:
                rows = load_preferences(
                    store,
                    reviewed_only=args.reviewed_only,
                    dataset=args.dataset,
                    run_id=args.run_id,
                    split=None if args.split == "all" else args.split,
                )
            write_preferences_parquet(rows, snapshot)
            logger.info("wrote %d preference rows to %s", len(rows), snapshot)
        else:
            raise HSCRError("no training data: pass --db DB or --data PARQUET")
    accelerator.wait_for_everyone()
    return _read_snapshot(snapshot)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hscr import jobs
    from hscr.models import load_vlm
    from hscr.trainer import StepInfo, make_accelerator, train

    config = load_config(TrainConfig, args.config, args.overrides)
    output = Path(args.output)
    device = None if args.device == "auto" else args.device
    accelerator = make_accelerator(config, device)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    rows = _snapshot_rows(args, output, accelerator)
    vlm = load_vlm(args.model, device=accelerator.device)

    bar = tqdm(desc="train", unit="step", disable=not accelerator.is_main_process)

    def on_step(info: StepInfo) -> None:
        bar.total = info.total_steps
        bar.update(info.step - bar.n)
        bar.set_postfix(loss=f"{info.metrics.get('loss', float('nan')):.4f}", epoch=f"{info.epoch:.2f}")
        rate = info.elapsed_s / max(info.step, 1)
        jobs.report_progress(
            fraction=info.step / info.total_steps,
            step=info.step,
            total=info.total_steps,
            message=f"step {info.step}/{info.total_steps}, loss {info.metrics.get('loss', float('nan')):.4f}",
            eta_s=None if info.step == 0 else rate * (info.total_steps - info.step),
        )

    try:
        result = train(vlm, rows, config, output, resume=args.resume, accelerator=accelerator, on_step=on_step)
    finally:
        bar.close()
    if not accelerator.is_main_process:
        return 0 if result.status == "completed" else 143
    if result.status == "interrupted":
        print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint_dir}; "
              f"continue with --resume")
        return 143  # 128 + SIGTERM, as a shell reports a terminated process
    print(f"trained {result.step} steps; adapter saved to {result.adapter_dir}")
    return 0
