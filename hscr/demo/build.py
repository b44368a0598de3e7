"""Build what the embedded demo needs and is missing: the demo model and the demo datasets.

``ensure_demo`` is what ``python -m hscr demo`` and ``python app.py`` call. A second call finds
the finished model (its manifest is written last) and the imported samples, and returns in
seconds. ``force=True`` rebuilds the model from scratch and re-imports the datasets. Existing
samples are kept, because sample ids are content hashes.

    from hscr.demo import ensure_demo
    paths = ensure_demo("data")       # {"model_dir": "data/demo/model", "db_path": "data/hscr.duckdb", ...}
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hscr.demo.recipe import DemoRecipe, read_manifest
from hscr.demo.phantoms import GENERATOR_VERSION, Phantom, make_phantom, stored_questions
from hscr.errors import HSCRError
from hscr.store import Store

logger = logging.getLogger(__name__)

DATASET = "demo"

# Images of the stored demo dataset: the first images of the model's training pool, and the
# test split that the build's reported metrics use.
STORED_TRAIN_IMAGES = 300

# Images stored per database transaction.
IMPORT_CHUNK = 50

# Weights committed with the package; used when their recipe key equals the requested one.
PREBUILT_DIR = Path(__file__).parent / "prebuilt"

Progress = Callable[[str, int, int], None]


class _Bars:
    """One tqdm bar per stage, for ``progress=True``."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, advance: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            units = {"train": "step", "phantoms": "image", "import": "image"}
            bar = self.bars[stage] = tqdm(total=total, desc=f"demo {stage}", unit=units.get(stage, "item"))
        if bar.n + advance > bar.total:
            bar.total = bar.n + advance  # training continues past its planned steps
        bar.update(advance)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def demo_paths(data_dir: str | Path, db_path: str | Path | None = None) -> dict[str, Path]:
    data_dir = Path(data_dir)
    return {"model_dir": data_dir / "demo" / "model", "db_path": Path(db_path) if db_path else data_dir / "hscr.duckdb"}


def ensure_demo(
    data_dir: str | Path = "data",
    progress: bool | Progress = True,
    force: bool = False,
    db_path: str | Path | None = None,
    recipe: DemoRecipe | None = None,
    import_dicom: bool = True,
) -> dict[str, Any]:
    """Build the demo model and import the demo datasets where they are missing.

    Returns ``model_dir`` and ``db_path`` (strings), ``model_source`` ("existing", "prebuilt" or
    "trained"), the held-out metrics from the model's manifest under ``report``, and the number
    of samples inserted per dataset under ``imported``.
    """
    recipe = recipe or DemoRecipe()
    paths = demo_paths(data_dir, db_path)
    model_dir, db_file = paths["model_dir"], paths["db_path"]
    bars = _Bars() if progress is True else None
    callback: Progress | None = bars if bars is not None else (progress or None)
    started = time.monotonic()
    try:
        source, pool = _ensure_model(model_dir, recipe, force, callback)
        imported = _ensure_datasets(db_file, recipe, force, callback, pool, import_dicom)
    finally:
        if bars is not None:
            bars.close()
    manifest = read_manifest(model_dir) or {}
    result = {
        "model_dir": str(model_dir),
        "db_path": str(db_file),
        "model_source": source,
        "report": manifest.get("report", {}),
        "imported": imported,
        "seconds": round(time.monotonic() - started, 1),
    }
    if source == "trained":
        prebuilt = read_manifest(PREBUILT_DIR)
        if prebuilt and prebuilt.get("key") == recipe.key():
            result["matches_prebuilt"] = prebuilt.get("weights_sha256") == manifest.get("weights_sha256")
    return result


# -- model -----------------------------------------------------------------------------------------


def _ensure_model(model_dir: Path, recipe: DemoRecipe, force: bool,
                  progress: Progress | None) -> tuple[str, list[Phantom] | None]:
    manifest = read_manifest(model_dir)
    if not force and manifest and manifest.get("key") == recipe.key():
        logger.info("demo model found in %s", model_dir)
        return "existing", None
    if manifest and manifest.get("key") != recipe.key() and not force:
        logger.info("demo model in %s was built with another recipe; rebuilding it", model_dir)

    prebuilt = read_manifest(PREBUILT_DIR)
    if not force and prebuilt and prebuilt.get("key") == recipe.key():
        _replace_dir(model_dir, lambda target: shutil.copytree(PREBUILT_DIR, target))
        logger.info("demo model copied from the prebuilt weights in %s", PREBUILT_DIR)
        return "prebuilt", None

    # Imported only when training: torch takes seconds to import.
    from hscr.demo.model import draw_phantoms, train_demo_model

    pool = draw_phantoms("train", 0, recipe.train_images, recipe, progress,
                         total=recipe.train_images + recipe.validation_images + recipe.test_images)
    logger.info("training the demo model (%d steps at least) into %s", recipe.steps, model_dir)
    holder: dict[str, Any] = {}

    def train(target: Path) -> None:
        holder["report"] = train_demo_model(recipe, target, progress=progress, train_phantoms=pool)

    _replace_dir(model_dir, train)
    report = holder["report"]
    logger.info(
        "demo model: %d steps in %.0f s; held-out closed accuracy %.3f (%.3f with 70%% of image tokens "
        "removed), open recall %.3f",
        report.steps, report.seconds, report.test.get("closed", 0.0), report.test_drop70.get("closed", 0.0),
        report.test.get("open", 0.0),
    )
    return "trained", pool


def _replace_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build into a sibling folder, then swap it in, so an interrupted build leaves no half model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        fill(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)


# -- datasets --------------------------------------------------------------------------------------


def expected_counts(recipe: DemoRecipe) -> dict[str, int]:
    """Number of stored images per split of the ``demo`` dataset."""
    return {"train": min(STORED_TRAIN_IMAGES, recipe.train_images), "test": recipe.test_images}


def _ensure_datasets(db_path: Path, recipe: DemoRecipe, force: bool, progress: Progress | None,
                     pool: Sequence[Phantom] | None, import_dicom: bool) -> dict[str, int]:
    from hscr.demo.dicom_demo import DATASET as DICOM_DATASET, import_dicom_demo

    imported = {DATASET: 0, DICOM_DATASET: 0}
    with Store(db_path) as store:
        counts = _image_counts(store, DATASET)
        wanted = expected_counts(recipe)
        if force or any(counts.get(split, 0) < n for split, n in wanted.items()):
            imported[DATASET] = _import_phantoms(store, recipe, wanted, pool, progress)
        else:
            logger.info("dataset %r already in %s", DATASET, db_path)
        if import_dicom:
            if force or not _image_counts(store, DICOM_DATASET):
                imported[DICOM_DATASET] = import_dicom_demo(store)["inserted"]
            else:
                logger.info("dataset %r already in %s", DICOM_DATASET, db_path)
    return imported


def _image_counts(store: Store, dataset: str) -> dict[str, int]:
    rows = store.query(
        "SELECT split, count(DISTINCT image_id) AS n FROM samples WHERE dataset = ? GROUP BY split", [dataset]
    )
    return {row["split"]: int(row["n"]) for row in rows}


def _import_phantoms(store: Store, recipe: DemoRecipe, wanted: dict[str, int], pool: Sequence[Phantom] | None,
                     progress: Progress | None) -> int:
    """Store the demo images and their questions, in transactions of :data:`IMPORT_CHUNK` images."""
    total = sum(wanted.values())
    inserted = 0
    for split, count in wanted.items():
        for start in range(0, count, IMPORT_CHUNK):
            indices = range(start, min(start + IMPORT_CHUNK, count))
            phantoms = [
                pool[index] if split == "train" and pool is not None and index < len(pool)
                else make_phantom(split, index, recipe.data_seed, recipe.render_size)
                for index in indices
            ]
            with store.transaction() as cur:
                for phantom in phantoms:
                    inserted += _store_phantom(store, cur, phantom, recipe)
            if progress:
                progress("import", len(phantoms), total)
    logger.info("stored %d new samples in dataset %r", inserted, DATASET)
    return inserted


def _store_phantom(store: Store, cur, phantom: Phantom, recipe: DemoRecipe) -> int:
    buffer = io.BytesIO()
    phantom.image().save(buffer, format="PNG")
    meta = {"phantom": phantom.name, "generator_version": GENERATOR_VERSION, "seed": recipe.data_seed,
            **phantom.attributes()}
    image_id = store.add_image(buffer.getvalue(), phantom.pixels.shape[1], phantom.pixels.shape[0],
                               modality=phantom.modality, source_format="png", meta=meta, cursor=cur)
    inserted = 0
    for number, qa in enumerate(stored_questions(phantom, recipe.data_seed)):
        _, new = store.add_sample(DATASET, phantom.split, image_id, qa.question, qa.answer, qa.answer_type,
                                  source_id=f"{phantom.name}#{number}",
                                  meta={"family": qa.family, "lesion_question": qa.local}, cursor=cur)
        inserted += int(new)
    return inserted


def describe(result: dict[str, Any]) -> str:
    """Format :func:`ensure_demo`'s result as a few human-readable lines."""
    report = result.get("report") or {}
    test, dropped = report.get("test") or {}, report.get("test_drop70") or {}
    lines = [f"demo model: {result['model_dir']} ({result['model_source']})",
             f"database:   {result['db_path']} (new samples: {json.dumps(result['imported'])})"]
    if test:
        lines.append(
            f"held-out:   closed accuracy {test.get('closed', 0):.3f} (lesion questions {test.get('closed_lesion', 0):.3f}), "
            f"open recall {test.get('open', 0):.3f}; with 70% of image tokens removed: closed "
            f"{dropped.get('closed', 0):.3f}, open {dropped.get('open', 0):.3f}"
        )
    if "matches_prebuilt" in result:
        lines.append(f"prebuilt:   rebuilt weights {'match' if result['matches_prebuilt'] else 'differ from'} the committed ones")
    return "\n".join(lines)


def check_data_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise HSCRError(f"data folder {path} is a file; pass a folder with --data-dir")
    return path
