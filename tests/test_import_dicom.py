"""DICOM through the folder importer, and the de-identification guarantee end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from fixtures_datasets import run_import, write_dicom_folder
from hscr.images import load_any
from hscr.preferences import load_preferences, write_preferences_parquet
from hscr.store import Store

REPO = Path(__file__).resolve().parent.parent
PRIVATE_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName")
# Decodable files with patient data, one multi-frame, one colour JPEG; two that fail to decode.
DICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm", "rtdose.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "MR_truncated.dcm", "JPEG-lossy.dcm",
]
FAILING = {"MR_truncated.dcm", "JPEG-lossy.dcm"}


def _private_values() -> set[str]:
    values = set()
    for name in DICOM_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        for keyword in PRIVATE_TAGS:
            value = str(ds.get(keyword) or "").strip()
            if value and value.lower() not in ("none", "anonymized"):
                values.add(value)
    return values


def _all_text_values(db_path: Path) -> str:
    """Every string stored in the database, read through SQL (storage may compress them)."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        texts = []
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE data_type LIKE 'VARCHAR%' AND table_schema = 'main'"
        ).fetchall()
        for table, column in columns:
            rows = con.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL').fetchall()
            texts.extend(str(row[0]) for row in rows)
        return "\n".join(texts)
    finally:
        con.close()


def test_folder_imports_dicom_with_frames(tmp_path: Path):
    folder = write_dicom_folder(tmp_path, ["CT_small.dcm", "rtdose.dcm", "MR_truncated.dcm"], frames={"rtdose.dcm": 3})
    db = tmp_path / "db.duckdb"
    code, report, _, err = run_import("folder", str(folder), "--db", str(db))
    assert code == 1
    assert report["imported"] == {"train": 2, "test": 1}
    assert len(report["errors"]) == 1
    assert "samples.csv line 4" in report["errors"][0]
    assert "MR_truncated.dcm is truncated" in report["errors"][0]
    assert "Traceback" not in err
    with Store(db) as store:
        formats = {row["source_format"] for row in store.query("SELECT source_format FROM images")}
        metas = [json.loads(row["meta_json"]) for row in store.query("SELECT meta_json FROM images WHERE source_format = 'dicom'")]
        samples = store.samples()
    assert formats == {"dicom", "png"}
    by_modality = {meta["modality"]: meta for meta in metas}
    assert set(by_modality) == {"CT", "RTDOSE"}
    assert by_modality["RTDOSE"]["frame"] == 3
    assert by_modality["RTDOSE"]["frames"] == 15
    assert by_modality["CT"]["pixel_spacing"] == [0.661468, 0.661468]
    assert by_modality["CT"]["rows"] == 128
    assert "window_center" in by_modality["CT"]
    # The stored PNG is the default-window rendering of the chosen frame.
    rtdose_sample = next(row for row in samples if row["modality"] == "RTDOSE")
    expected = load_any(get_testdata_file("rtdose.dcm"), frame=3).image
    with Image.open(db.parent / rtdose_sample["image_path"]) as stored:
        assert stored.tobytes() == expected.tobytes()


def test_patient_data_never_stored(tmp_path: Path):
    folder = write_dicom_folder(tmp_path, DICOM_FILES)
    db = tmp_path / "data" / "hscr.duckdb"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "hscr", "-v", "import", "folder", str(folder), "--db", str(db), "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    logs = result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 1
    assert sum(report["imported"].values()) == len(DICOM_FILES) - len(FAILING) + 1
    assert len(report["errors"]) == len(FAILING)
    assert "Traceback" not in logs

    # An export: preference Parquet built from generated rows, plus a full CSV dump of the database.
    with Store(db) as store:
        samples = store.samples()
        store.ensure_generation_run("run1", "tiny", "{}")
        store.write_generation("run1", [
            {"sample_id": row["id"], "flagged": False, "model_answer": None, "tokens": [],
             "candidates": [
                 {"text": row["answer"], "num_replaced": 0, "rank": 0, "similarity": 1.0, "kept": True, "ref_logp": -1.0},
                 {"text": "something else", "num_replaced": 1, "rank": 1, "similarity": 0.4, "kept": True, "ref_logp": -3.0},
             ]}
            for row in samples
        ])
        preferences = load_preferences(store)
        export = write_preferences_parquet(preferences, tmp_path / "export" / "preferences.parquet")
        store.execute(f"EXPORT DATABASE '{tmp_path / 'dump'}' (FORMAT csv)")
    assert len(preferences) == len(samples)

    database_bytes = b"".join(path.read_bytes() for path in db.parent.glob("hscr.duckdb*"))
    stored_texts = _all_text_values(db)
    export_bytes = export.read_bytes()
    dump_text = "\n".join(path.read_text(encoding="utf-8") for path in (tmp_path / "dump").glob("*.csv"))
    pngs = sorted((db.parent / "images").glob("*.png"))
    assert len(pngs) == len(DICOM_FILES) - len(FAILING) + 1
    # Positive control: the scans do see what was imported.
    assert "What modality is image 0?" in stored_texts
    assert "What modality is image 0?" in dump_text

    values = _private_values()
    assert {"CompressedSamples^CT1", "JFK IMAGING CENTER", "11111111", "Lestrade^G"} <= values
    for value in values:
        assert value not in logs, value
        assert value not in stored_texts, value
        assert value not in dump_text, value
        encoded = value.encode("utf-8")
        if len(encoded) >= 6:  # shorter strings can occur by chance in binary data
            assert encoded not in database_bytes, value
            assert encoded not in export_bytes, value
            for png in pngs:
                assert encoded not in png.read_bytes(), (value, png.name)
    for png in pngs:
        with Image.open(png) as image:
            assert not {key for key in image.info if key not in ("dpi", "gamma")}, png.name


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_rendered_meta_is_whitelisted(name: str):
    loaded = load_any(get_testdata_file(name))
    text = json.dumps(loaded.meta)
    for value in _private_values():
        assert value not in text


def test_dicom_import_keeps_window_pixels(tmp_path):
    """Imported DICOMs keep full-range pixels beside the PNG, so viewers can re-window them."""
    import shutil

    from pydicom.data import get_testdata_file

    from hscr.datasets.common import ImportOptions
    from hscr.datasets.folder import import_path as import_folder
    from hscr.images import render_window
    from hscr.pixels import load_window_pixels
    from hscr.store import Store

    folder = tmp_path / "dicom-folder"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    (folder / "samples.csv").write_text("image,question,answer\nct.dcm,what modality is this?,ct\n", encoding="utf-8")
    with Store(tmp_path / "data" / "hscr.duckdb") as store:
        report = import_folder(store, folder, ImportOptions(name="dcm"))
        assert report.errors == []
        sample = store.samples(dataset="dcm")[0]
        png = store.data_dir / sample["image_path"]
        windowed = load_window_pixels(png)
        assert windowed is not None
        assert windowed.pixels.shape == (128, 128)
        assert windowed.pixels.min() < 0 < windowed.pixels.max()  # Hounsfield units, not 8-bit
        lung = render_window(windowed, -600, 1500)
        bone = render_window(windowed, 400, 1800)
        assert lung.size == bone.size == (128, 128)
        assert lung.tobytes() != bone.tobytes()
