"""Helpers shared by the hardening tests: a seeded review database and consistency checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from browser import AppProcess
from hscr.datasets import folder
from hscr.datasets.common import ImportOptions
from hscr.store import Store
from support import write_image_folder

RUN_ID = "gen-hardening"


def seed_review_db(db_path: Path, work: Path, num_samples: int = 6, dataset: str = "seed") -> dict[str, list[str]]:
    """Import ``num_samples`` samples and write generated candidates for each.

    Returns sample id -> ids of its dispreferred candidates. The store is closed afterwards, so
    the app can open the file.
    """
    rows = [{"image": f"case{k}.png", "question": f"is there a lesion in region {k} ?", "answer": "yes"}
            for k in range(num_samples)]
    write_image_folder(work / "seed-images", rows, image_size=16)
    with Store(db_path) as store:
        folder.import_path(store, work / "seed-images", ImportOptions(name=dataset))
        sample_ids = [s["id"] for s in store.samples(dataset=dataset)]
        store.ensure_generation_run(RUN_ID, "tiny", "{}")
        results = []
        for sample_id in sample_ids:
            candidates = [{"text": "yes", "num_replaced": 0, "similarity": 1.0, "rank": 0, "kept": True, "ref_logp": -1.0}]
            for rank, text in enumerate(["no", "no lesion", "not in this region"], start=1):
                candidates.append({"text": text, "num_replaced": rank, "replaced_positions": [0],
                                   "replaced_tokens": [text.split()[0]], "similarity": 1.0 - 0.3 * rank,
                                   "rank": rank, "kept": True, "ref_logp": -2.0 * rank})
            tokens = [{"position": 0, "token": "yes", "score": 0.5, "p_full": 0.6, "p_drop": 0.3, "coupled": True}]
            results.append({"sample_id": sample_id, "flagged": False, "model_answer": "yes",
                            "candidates": candidates, "tokens": tokens})
        store.write_generation(RUN_ID, results)
        return {
            sample_id: [c["id"] for c in store.candidates_for(sample_id) if c["num_replaced"] > 0]
            for sample_id in sample_ids
        }


def consistency_problems(db_path: Path) -> list[str]:
    """List half-written state: samples without an image row, image rows without a file,
    leftover temporary files, and review rows that do not parse."""
    problems = []
    with Store(db_path, read_only=True) as store:
        orphans = store.query("SELECT s.id FROM samples s LEFT JOIN images i ON i.id = s.image_id WHERE i.id IS NULL")
        problems += [f"sample {row['id']} has no image row" for row in orphans]
        for row in store.query("SELECT id, path FROM images"):
            if not (store.data_dir / row["path"]).is_file():
                problems.append(f"image {row['id']} has no file at {row['path']}")
        for row in store.query('SELECT id, "user", action, payload_json FROM reviews'):
            try:
                json.loads(row["payload_json"] or "{}")
            except json.JSONDecodeError:
                problems.append(f"review {row['id']} has an unreadable payload {row['payload_json']!r}")
            if not row["user"] or not row["action"]:
                problems.append(f"review {row['id']} lacks a user or action")
        image_dir = store.image_dir
    problems += [f"temporary file left behind: {path}" for path in image_dir.glob("*.tmp")]
    return problems


class PrefixedApp(AppProcess):
    """``python app.py`` started through a wrapper command, such as ``setpriv`` or ``unshare``."""

    def __init__(self, db: Path, model: Path | str, prefix: list[str], extra_args: list[str] | None = None):
        super().__init__(db, model, extra_args)
        self.prefix = list(prefix)


def without_root_override() -> list[str]:
    """Return a command prefix under which file modes bind root too, or [] for other users.

    Root ignores read-only modes through CAP_DAC_OVERRIDE; ``setpriv`` drops it from the
    capability bounding set of the started program.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise FileNotFoundError("setpriv (util-linux) is needed to test read-only folders as root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def tmpfs_prefix(mount_point: Path, seed: Path, size_mb: int) -> list[str] | None:
    """Return a command prefix that runs the program with a ``size_mb`` tmpfs mounted at ``mount_point``
    holding a copy of ``seed``, in its own user and mount namespace; None when the kernel forbids it."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount_point}"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    script = f'mount -t tmpfs -o size={size_mb}m tmpfs "$0" && cp -a "$1"/. "$0"/ && shift && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(mount_point), str(seed)]
