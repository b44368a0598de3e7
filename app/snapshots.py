"""Job inputs the app writes into a run folder, and the results it ingests back.

Only the app process opens the DuckDB file (read-write), so a job never opens it. For an
evaluation or a generation, the app copies the split's samples and image rows into
``<run>/data/hscr.duckdb`` (the image folder is linked, not copied). The job runs
``python -m hscr evaluate|generate --db <run>/data/hscr.duckdb``, and the app copies the new
result rows back in one transaction.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from hscr.errors import HSCRError
from hscr.store import Store

logger = logging.getLogger(__name__)

SNAPSHOT_DB = Path("data") / "hscr.duckdb"
INGESTED_FILE = "ingested.json"
_INGEST_LOCK = threading.Lock()


def write_split_snapshot(store: Store, run_dir: Path, dataset: str, split: str) -> tuple[Path, int]:
    """Copy one dataset split's samples and image rows into the run folder's own database.

    Returns the snapshot database path and the number of samples copied.
    """
    samples = store.query("SELECT * FROM samples WHERE dataset = ? AND split = ? ORDER BY id", [dataset, split])
    if not samples:
        raise HSCRError(f"dataset {dataset!r} has no samples in split {split!r}; choose another split")
    image_ids = sorted({row["image_id"] for row in samples})
    images = store.query("SELECT * FROM images WHERE id IN (SELECT unnest(?))", [image_ids])

    db_path = run_dir / SNAPSHOT_DB
    db_path.parent.mkdir(parents=True, exist_ok=True)
    link = db_path.parent / "images"
    if not link.exists():
        link.symlink_to(store.image_dir.resolve(), target_is_directory=True)
    with Store(db_path) as snapshot, snapshot.transaction() as cur:
        _insert_rows(cur, "images", images)
        _insert_rows(cur, "samples", samples)
    return db_path, len(samples)


def _insert_rows(cursor: Any, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    cursor.executemany(
        f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING",
        [[row[c] for c in columns] for row in rows],
    )


EVALUATION_TABLES = ("eval_runs", "predictions")
GENERATION_TABLES = ("generation_runs", "candidates", "token_scores", "generation_done")


def _ingest(store: Store, run_dir: Path, tables: tuple[str, ...]) -> dict[str, int]:
    """Copy the rows of ``tables`` from a finished job's snapshot database once, in one transaction.

    Returns rows copied per table; empty when the run folder was ingested before. The last table
    is the one whose rows mark a result complete, so it is written last.
    """
    run_dir = Path(run_dir)
    marker = run_dir / INGESTED_FILE
    db_path = run_dir / SNAPSHOT_DB
    with _INGEST_LOCK:
        if marker.exists() or not db_path.is_file():
            return {}
        with Store(db_path, read_only=True) as snapshot:
            rows = {table: snapshot.query(f"SELECT * FROM {table}") for table in tables}
        with store.transaction() as cur:
            for table in tables:
                _insert_rows(cur, table, rows[table])
        counts = {table: len(rows[table]) for table in tables}
        marker.write_text(json.dumps(counts))
    logger.info("ingested %s from %s", counts, run_dir)
    return counts


def ingest_evaluation(store: Store, run_dir: Path) -> int:
    """Copy a finished evaluation job's runs and predictions into the app's database once.

    Returns the number of prediction rows copied; 0 when the run folder was ingested before.
    """
    return _ingest(store, run_dir, EVALUATION_TABLES).get("predictions", 0)


def ingest_generation(store: Store, run_dir: Path) -> int:
    """Copy a finished generation job's candidates and token scores into the app's database once.

    Returns the number of samples copied; 0 when the run folder was ingested before.
    """
    return _ingest(store, run_dir, GENERATION_TABLES).get("generation_done", 0)
