"""DuckDB schema and queries.

One process (the app, or a headless command) opens the database file read-write and shares one
connection, with a cursor per thread. Generated data is never overwritten: reviewer edits are
new rows in ``reviews``. Writes that belong together go through :meth:`Store.transaction`, so a
crash leaves either all rows of a sample or none.

Images are stored once, content-addressed, under ``<data>/images/<sha256>.png``; the database
holds their metadata only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import duckdb

from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);

CREATE TABLE IF NOT EXISTS images (
    id VARCHAR PRIMARY KEY,          -- sha256 of the stored PNG/original bytes
    sha256 VARCHAR NOT NULL,
    path VARCHAR NOT NULL,           -- relative to the data folder
    width INTEGER,
    height INTEGER,
    modality VARCHAR,
    source_format VARCHAR,           -- png, jpeg, dicom, ...
    meta_json VARCHAR,               -- non-identifying fields only (window, spacing, body part)
    created_at TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS samples (
    id VARCHAR PRIMARY KEY,
    dataset VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    question VARCHAR NOT NULL,
    answer VARCHAR NOT NULL,
    answer_type VARCHAR NOT NULL,    -- 'open' or 'closed'
    lang VARCHAR NOT NULL DEFAULT 'en',
    source_id VARCHAR,               -- the id in the original dataset (qid, question_id)
    meta_json VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS generation_runs (
    id VARCHAR PRIMARY KEY,          -- hash of model + method settings
    created_at TIMESTAMP DEFAULT current_timestamp,
    model VARCHAR NOT NULL,
    config_json VARCHAR NOT NULL
);

-- one row per (run, sample) once all of the sample's rows are written
CREATE TABLE IF NOT EXISTS generation_done (
    run_id VARCHAR NOT NULL,
    sample_id VARCHAR NOT NULL,
    flagged BOOLEAN NOT NULL,        -- fewer than two kept dispreferred responses
    model_answer VARCHAR,            -- greedy answer with the full image, when computed
    done_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (run_id, sample_id)
);

CREATE TABLE IF NOT EXISTS candidates (
    id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,
    sample_id VARCHAR NOT NULL,
    text VARCHAR NOT NULL,
    num_replaced INTEGER NOT NULL,   -- 0 is the preferred answer y_w
    replaced_positions INTEGER[],    -- answer-token positions that were replaced
    replaced_tokens VARCHAR[],       -- the replacement tokens, same order
    similarity DOUBLE,               -- cosine similarity to y_w
    rank INTEGER,                    -- 0 for y_w, 1.. by similarity, descending
    kept BOOLEAN NOT NULL,
    ref_logp DOUBLE                  -- summed log-prob under the unchanged model (kept rows and y_w)
);

CREATE TABLE IF NOT EXISTS token_scores (
    run_id VARCHAR NOT NULL,
    sample_id VARCHAR NOT NULL,
    position INTEGER NOT NULL,       -- index in the answer tokens
    token VARCHAR NOT NULL,
    score DOUBLE NOT NULL,           -- s_t = log p_full(y_t) - log p_drop(y_t)
    p_full DOUBLE NOT NULL,
    p_drop DOUBLE NOT NULL,
    coupled BOOLEAN NOT NULL,        -- among the n most coupled positions
    replacement VARCHAR,             -- chosen replacement token for coupled positions
    PRIMARY KEY (run_id, sample_id, position)
);

CREATE SEQUENCE IF NOT EXISTS reviews_seq;
CREATE TABLE IF NOT EXISTS reviews (
    id BIGINT PRIMARY KEY DEFAULT nextval('reviews_seq'),
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    "user" VARCHAR NOT NULL,
    sample_id VARCHAR NOT NULL,
    candidate_id VARCHAR,
    action VARCHAR NOT NULL,         -- edit, rerank, acceptable, reject, approve, note, ...
    payload_json VARCHAR
);

CREATE TABLE IF NOT EXISTS eval_runs (
    id VARCHAR PRIMARY KEY,
    created_at TIMESTAMP DEFAULT current_timestamp,
    model VARCHAR NOT NULL,
    adapter VARCHAR,
    dataset VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    config_json VARCHAR,
    metrics_json VARCHAR
);

CREATE TABLE IF NOT EXISTS predictions (
    eval_run_id VARCHAR NOT NULL,
    sample_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    adapter VARCHAR,
    text VARCHAR NOT NULL,
    score_paper DOUBLE,
    score_strict DOUBLE,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (eval_run_id, sample_id)
);

CREATE INDEX IF NOT EXISTS samples_dataset_idx ON samples (dataset, split);
CREATE INDEX IF NOT EXISTS candidates_sample_idx ON candidates (run_id, sample_id);
CREATE INDEX IF NOT EXISTS reviews_sample_idx ON reviews (sample_id);
"""


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def sample_key(dataset: str, split: str, image_id: str, question: str) -> str:
    """Return the id of a sample: the same image and question in one split is one sample."""
    normalized = " ".join(question.split()).lower()
    raw = f"{dataset}\x1f{split}\x1f{image_id}\x1f{normalized}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:20]


def candidate_key(run_id: str, sample_id: str, text: str) -> str:
    raw = f"{run_id}\x1f{sample_id}\x1f{text}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:20]


class Store:
    """A DuckDB database file plus the content-addressed image folder beside it."""

    def __init__(self, db_path: str | Path, image_dir: str | Path | None = None, read_only: bool = False):
        self.db_path = Path(db_path)
        self.data_dir = self.db_path.parent
        self.image_dir = Path(image_dir) if image_dir else self.data_dir / "images"
        self.read_only = read_only
        if not read_only:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self.image_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HSCRError(f"cannot create data folder {self.data_dir}: {exc.strerror}; choose a writable --db path") from None
        elif not self.db_path.exists():
            raise HSCRError(f"database not found: {self.db_path}")
        try:
            self._conn = duckdb.connect(str(self.db_path), read_only=read_only)
        except duckdb.IOException as exc:
            if not read_only and not _writable(self.db_path):
                raise ReadOnlyError(
                    f"cannot open database {self.db_path} for writing: it or its folder is read-only; make "
                    f"{self.data_dir} writable, or open it read-only"
                ) from None
            raise HSCRError(
                f"cannot open database {self.db_path}: {exc}. If another HSCR process (the app or a "
                "command) has it open, stop that process or use another --db."
            ) from None
        self._local = threading.local()
        self._lock = threading.RLock()
        if not read_only:
            self._conn.execute(SCHEMA)
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    # -- connections ---------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Return this thread's cursor on the shared connection."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._conn.cursor()
            self._local.cursor = cur
        return cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run the block in one transaction on this thread's cursor; roll back on any error."""
        if self.read_only:
            raise ReadOnlyError(
                f"the database {self.db_path} is open read-only because its folder is not writable, so "
                f"nothing can be saved; make {self.data_dir} writable and restart"
            )
        cur = self.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        try:
            cur.execute("COMMIT")
        except duckdb.Error as exc:
            # A full disk fails the commit (the write-ahead log cannot grow); reads keep working.
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
            logger.error("commit to %s failed: %s", self.db_path, exc)
            raise HSCRError(
                f"cannot save to {self.db_path} ({exc}); nothing of this change was saved. Free disk space "
                f"in {self.data_dir} or make it writable, then try again"
            ) from None

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> duckdb.DuckDBPyConnection:
        return self.cursor().execute(sql, params or [])

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a query and return rows as dicts."""
        cur = self.cursor().execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- images and samples --------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        rows = self.execute("SELECT path FROM images WHERE id = ?", [image_id]).fetchall()
        if not rows:
            raise HSCRError(f"image {image_id} not found in {self.db_path}")
        return self.data_dir / rows[0][0]

    def add_image(
        self,
        png_bytes: bytes,
        width: int,
        height: int,
        modality: str | None = None,
        source_format: str | None = None,
        meta: dict[str, Any] | None = None,
        cursor: duckdb.DuckDBPyConnection | None = None,
    ) -> str:
        """Store PNG bytes once under the image folder and record them; return the image id."""
        sha = hashlib.sha256(png_bytes).hexdigest()
        target = self.image_dir / f"{sha}.png"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            try:
                tmp.write_bytes(png_bytes)
                tmp.replace(target)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise HSCRError(
                    f"cannot write image {target}: {exc.strerror}; free disk space in {self.image_dir} or make it "
                    "writable, then import again"
                ) from None
        rel = target.relative_to(self.data_dir) if target.is_relative_to(self.data_dir) else target
        cur = cursor or self.cursor()
        cur.execute(
            "INSERT INTO images (id, sha256, path, width, height, modality, source_format, meta_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            [sha, sha, str(rel), width, height, modality, source_format, json.dumps(meta or {}, sort_keys=True)],
        )
        return sha

    def add_sample(
        self,
        dataset: str,
        split: str,
        image_id: str,
        question: str,
        answer: str,
        answer_type: str,
        lang: str = "en",
        source_id: str | None = None,
        meta: dict[str, Any] | None = None,
        cursor: duckdb.DuckDBPyConnection | None = None,
    ) -> tuple[str, bool]:
        """Insert a sample unless the same (dataset, split, image, question) exists.

        Returns the sample id and whether a row was inserted.
        """
        if answer_type not in ("open", "closed"):
            raise HSCRError(f"invalid answer_type={answer_type!r}: expected 'open' or 'closed'")
        sample_id = sample_key(dataset, split, image_id, question)
        cur = cursor or self.cursor()
        exists = cur.execute("SELECT 1 FROM samples WHERE id = ?", [sample_id]).fetchall()
        if exists:
            return sample_id, False
        cur.execute(
            "INSERT INTO samples (id, dataset, split, image_id, question, answer, answer_type, lang, source_id, meta_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [sample_id, dataset, split, image_id, question, answer, answer_type, lang, source_id,
             json.dumps(meta or {}, sort_keys=True, ensure_ascii=False)],
        )
        return sample_id, True

    def samples(
        self,
        dataset: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        ids: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Return samples joined with their image path, in a stable order."""
        where, params = [], []
        if dataset:
            where.append("s.dataset = ?")
            params.append(dataset)
        if split:
            where.append("s.split = ?")
            params.append(split)
        if ids is not None:
            id_list = list(ids)
            if not id_list:
                return []
            where.append("s.id IN (SELECT unnest(?))")
            params.append(id_list)
        sql = (
            "SELECT s.*, i.path AS image_path, i.modality AS modality FROM samples s "
            "JOIN images i ON i.id = s.image_id"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY s.dataset, s.split, s.created_at, s.id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self.query(sql, params)

    def datasets(self) -> list[dict[str, Any]]:
        return self.query(
            "SELECT dataset, split, count(*) AS n FROM samples GROUP BY dataset, split ORDER BY dataset, split"
        )

    # -- generation ----------------------------------------------------------------------------

    def ensure_generation_run(self, run_id: str, model: str, config_json: str) -> None:
        self.execute(
            "INSERT INTO generation_runs (id, model, config_json) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
            [run_id, model, config_json],
        )

    def done_sample_ids(self, run_id: str) -> set[str]:
        rows = self.execute("SELECT sample_id FROM generation_done WHERE run_id = ?", [run_id]).fetchall()
        return {r[0] for r in rows}

    def write_generation(self, run_id: str, results: Sequence[dict[str, Any]]) -> None:
        """Write the candidates and token scores of finished samples, all in one transaction.

        Each result has ``sample_id``, ``flagged``, ``model_answer``, ``candidates`` (dicts with
        the ``candidates`` columns but ``id``/``run_id``/``sample_id``) and ``tokens`` (dicts with
        the ``token_scores`` columns but ``run_id``/``sample_id``).
        """
        with self.transaction() as cur:
            for result in results:
                sample_id = result["sample_id"]
                already = cur.execute(
                    "SELECT 1 FROM generation_done WHERE run_id = ? AND sample_id = ?", [run_id, sample_id]
                ).fetchall()
                if already:
                    continue
                cand_rows = [
                    [
                        candidate_key(run_id, sample_id, c["text"]),
                        run_id,
                        sample_id,
                        c["text"],
                        int(c["num_replaced"]),
                        list(c.get("replaced_positions") or []),
                        list(c.get("replaced_tokens") or []),
                        _float_or_none(c.get("similarity")),
                        c.get("rank"),
                        bool(c["kept"]),
                        _float_or_none(c.get("ref_logp")),
                    ]
                    for c in result["candidates"]
                ]
                if cand_rows:
                    cur.executemany(
                        "INSERT INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", cand_rows
                    )
                token_rows = [
                    [run_id, sample_id, int(t["position"]), t["token"], float(t["score"]), float(t["p_full"]),
                     float(t["p_drop"]), bool(t["coupled"]), t.get("replacement")]
                    for t in result["tokens"]
                ]
                if token_rows:
                    cur.executemany("INSERT INTO token_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", token_rows)
                cur.execute(
                    "INSERT INTO generation_done (run_id, sample_id, flagged, model_answer) VALUES (?, ?, ?, ?)",
                    [run_id, sample_id, bool(result["flagged"]), result.get("model_answer")],
                )

    def candidates_for(self, sample_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
        """Return the generated candidates of a sample (latest run unless ``run_id``), y_w first."""
        if run_id is None:
            run_id = self.latest_run_for(sample_id)
            if run_id is None:
                return []
        return self.query(
            "SELECT * FROM candidates WHERE run_id = ? AND sample_id = ? ORDER BY rank NULLS LAST, num_replaced",
            [run_id, sample_id],
        )

    def latest_run_for(self, sample_id: str) -> str | None:
        rows = self.execute(
            "SELECT d.run_id FROM generation_done d WHERE d.sample_id = ? ORDER BY d.done_at DESC LIMIT 1",
            [sample_id],
        ).fetchall()
        return rows[0][0] if rows else None

    def token_scores_for(self, sample_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM token_scores WHERE run_id = ? AND sample_id = ? ORDER BY position",
            [run_id, sample_id],
        )

    # -- reviews -------------------------------------------------------------------------------

    def add_review(
        self,
        user: str,
        sample_id: str,
        action: str,
        payload: dict[str, Any] | None = None,
        candidate_id: str | None = None,
    ) -> int:
        """Append one review row and return its id."""
        if not user:
            raise HSCRError("a review needs a user name")
        with self.transaction() as cur:
            row = cur.execute(
                'INSERT INTO reviews ("user", sample_id, candidate_id, action, payload_json, created_at) '
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                [user, sample_id, candidate_id, action, json.dumps(payload or {}, ensure_ascii=False), utc_now()],
            ).fetchone()
        return int(row[0])

    def reviews_for(self, sample_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM reviews WHERE sample_id = ? ORDER BY id", [sample_id])


class ReadOnlyError(HSCRError):
    """A write was requested but the database or its folder is read-only."""


def _writable(path: Path) -> bool:
    """Return whether the database file (or, before it exists, its folder) accepts writes."""
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    return os.access(path.parent, os.W_OK)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
