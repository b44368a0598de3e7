"""Privacy and access against the real app: no DICOM patient tag leaves the importer, login guards
every route, and path traversal in import paths and upload names is rejected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pydicom
import pytest

from app.auth import hash_password, write_users
from browser import AppProcess
from hardening_support import RUN_ID, consistency_problems, seed_review_db
from hscr.__main__ import main as hscr_main
from hscr.store import Store

DICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "SC_rgb_small_odd.dcm", "rtdose_1frame.dcm"]
# Tags that identify a patient, a physician, an institution or a study.
IDENTIFYING_TAGS = {
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "PhysiciansOfRecord", "StudyID",
}


def dicom_path(name: str) -> Path:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    assert path.is_file(), f"pydicom test file {name} is missing"
    return path


def identifying_values(paths: list[Path]) -> set[str]:
    """Patient and institution tag values of the files, with person-name parts, 4 characters or longer."""
    values = set()
    for path in paths:
        for element in pydicom.dcmread(path).iterall():
            if element.keyword not in IDENTIFYING_TAGS or element.value in (None, ""):
                continue
            text = str(element.value).strip()
            values.add(text)
            values.update(part for part in text.replace("^", " ").split())
    return {value for value in values if len(value) >= 4 and value.strip("-^ ")}


def leaks_in_files(root: Path, values: set[str]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{value!r} in {path}" for value in values if value.encode("utf-8") in data]
    return found


def leaks_in_database(db: Path, values: set[str]) -> list[str]:
    # DuckDB compresses strings on disk, so the file bytes alone could hide a value.
    found = []
    with Store(db, read_only=True) as store:
        tables = [row["table_name"] for row in store.query("SELECT table_name FROM information_schema.tables")]
        for table in tables:
            for row in store.query(f'SELECT * FROM "{table}"'):
                text = json.dumps(row, default=str)
                found += [f"{value!r} in table {table}" for value in values if value in text]
    return found


@pytest.fixture
def dicom_folder(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    lines = ["image,question,answer"]
    for name in DICOM_FILES:
        shutil.copyfile(dicom_path(name), folder / name)
        lines.append(f"{name},which modality is this ?,ct")
    (folder / "samples.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_imported_dicoms_leave_no_patient_tags(tmp_path, tiny_model_dir, dicom_folder):
    from gradio_client import Client, handle_file

    values = identifying_values([dicom_path(name) for name in DICOM_FILES])
    assert {"CompressedSamples^CT1", "1234ABCD", "Lestrade^G", "Moriarty", "JFK IMAGING CENTER"} <= values
    db = tmp_path / "data" / "hscr.duckdb"
    Store(db).close()

    with AppProcess(db, tiny_model_dir) as app:
        client = Client(app.url, verbose=False)
        uploaded = client.predict([handle_file(str(dicom_path(n))) for n in DICOM_FILES], "uploads", "train",
                                  "which modality is this ?", "ct", api_name="/upload_files")
        imported = client.predict("folder", str(dicom_folder), "scans", "train", api_name="/import_dataset")
        table = client.predict("(all)", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[0]
        sample_ids = [row[table["headers"].index("id")] for row in table["data"]]
        for sample_id in sample_ids:
            client.predict(sample_id, api_name="/load_sample")       # renders images into Gradio's cache
    assert "imported 5 samples" in uploaded, uploaded
    assert "imported 5 samples" in imported, imported

    # Preference data for every sample, exported as the trainers read it.
    with Store(db) as store:
        store.ensure_generation_run(RUN_ID, "tiny", "{}")
        store.write_generation(RUN_ID, [{
            "sample_id": sample_id, "flagged": False, "model_answer": "ct", "tokens": [],
            "candidates": [{"text": "ct", "num_replaced": 0, "similarity": 1.0, "rank": 0, "kept": True, "ref_logp": -1.0},
                           {"text": "mri", "num_replaced": 1, "similarity": 0.4, "rank": 1, "kept": True, "ref_logp": -3.0}],
        } for sample_id in sample_ids])
    exports = tmp_path / "data" / "exports"
    for fmt in ("trl", "listwise"):
        assert hscr_main(["export", "--db", str(db), "--format", fmt, "--output", str(exports / f"{fmt}.parquet")]) == 0

    assert len(sample_ids) == 10
    assert (tmp_path / "data" / "cache" / "gradio").is_dir()
    assert list((tmp_path / "data").glob("app-*.log"))
    assert leaks_in_files(tmp_path / "data", values) == []
    assert leaks_in_database(db, values) == []
    assert consistency_problems(db) == []


@pytest.mark.slow
def test_login_guards_every_route(tmp_path, tiny_model_dir):
    from gradio_client import Client

    db = tmp_path / "data" / "hscr.duckdb"
    seed_review_db(db, tmp_path, num_samples=2, dataset="ward7-cases")
    users = tmp_path / "users.json"
    write_users(users, {"alice": hash_password("alice-password", rounds=4)})

    with AppProcess(db, tiny_model_dir, extra_args=["--auth", str(users)]) as app:
        base = app.url.rstrip("/")
        anonymous = httpx.Client(base_url=base, timeout=30)
        refused = {
            "config": anonymous.get("/config"),
            "api info": anonymous.get("/gradio_api/info"),
            "queue join": anonymous.post("/gradio_api/queue/join", json={
                "data": ["(all)", "(all)", "(all)", "(all)", "(all)", 1], "fn_index": 0, "session_hash": "x"}),
            "call": anonymous.post("/gradio_api/call/browse", json={"data": ["(all)"] * 5 + [1]}),
            "upload": anonymous.post("/gradio_api/upload", files={"files": ("a.png", b"png", "image/png")}),
            "file": anonymous.get(f"/gradio_api/file={db}"),
        }
        for route, response in refused.items():
            assert response.status_code in (401, 403), f"{route}: {response.status_code} {response.text[:200]}"
        # The login page is public, but it must not describe the app: no endpoints, no dataset names.
        login_page = anonymous.get("/")
        assert login_page.status_code == 200
        assert "ward7-cases" not in login_page.text
        assert "save_chosen_edit" not in login_page.text

        with pytest.raises(Exception):
            Client(app.url, verbose=False)
        with pytest.raises(Exception):
            Client(app.url, auth=("alice", "wrong-password"), verbose=False)
        client = Client(app.url, auth=("alice", "alice-password"), verbose=False)
        counts = client.predict("(all)", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[1]
        assert "**2** samples match" in counts
        assert "ward7-cases" in Client(app.url, auth=("alice", "alice-password"), verbose=False).view_api(
            print_info=False, return_format="str")


@pytest.mark.slow
def test_path_traversal_is_rejected(tmp_path, tiny_model_dir):
    from gradio_client import Client, handle_file

    db = tmp_path / "data" / "hscr.duckdb"
    Store(db).close()
    secret = tmp_path / "secret.png"
    shutil.copyfile(dicom_path("CT_small.dcm"), tmp_path / "secret.dcm")
    from support import random_image

    random_image(1).save(secret)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    random_image(2).save(dataset / "ok.png")
    (dataset / "samples.csv").write_text(
        "image,question,answer\nok.png,is it ok ?,yes\n../secret.png,is it secret ?,yes\n"
        f"{secret},is it secret ?,yes\n",
        encoding="utf-8",
    )
    cache = tmp_path / "data" / "cache" / "gradio"

    with AppProcess(db, tiny_model_dir) as app:
        client = Client(app.url, verbose=False)
        report = client.predict("folder", str(dataset), "traversal", "train", api_name="/import_dataset")

        # An upload whose file name climbs out of the upload folder stays inside Gradio's cache.
        response = httpx.post(app.url + "gradio_api/upload", timeout=30,
                              files={"files": ("../../../../escaped.png", secret.read_bytes(), "image/png")})
        assert response.status_code == 200
        stored = Path(response.json()[0]).resolve()
        assert stored.is_relative_to(cache.resolve())
        assert stored.name == "escaped.png"
        assert not list(tmp_path.rglob("escaped.png")) or all(p.resolve().is_relative_to(cache.resolve())
                                                               for p in tmp_path.rglob("escaped.png"))

        # A request may not name a server file outside the upload folder for the handler to read.
        call = httpx.post(app.url + "gradio_api/call/upload_files", timeout=30, json={"data": [
            [{"path": str(tmp_path / "secret.dcm"), "meta": {"_type": "gradio.FileData"}}],
            "stolen", "train", "q ?", "a"]})
        event = call.json()["event_id"]
        outcome = httpx.get(app.url + f"gradio_api/call/upload_files/{event}", timeout=60).text
        assert "event: error" in outcome
        assert "not uploaded by a user" in outcome

        # A samples.csv uploaded with images cannot point outside them.
        csv = tmp_path / "upload" / "samples.csv"
        csv.parent.mkdir()
        csv.write_text(f"image,question,answer\n../secret.png,is it secret ?,yes\n{secret},x ?,yes\n", encoding="utf-8")
        uploaded = client.predict([handle_file(str(csv)), handle_file(str(dataset / "ok.png"))], "uploaded-csv",
                                  "train", "", "", api_name="/upload_files")

    assert "imported 1 samples" in report
    assert report.count("points outside") == 2
    assert "imported 0 samples" in uploaded
    assert uploaded.count("points outside") == 2
    with Store(db, read_only=True) as store:
        datasets = {row["dataset"]: row["n"] for row in store.datasets()}
    assert datasets == {"traversal": 1}
    assert consistency_problems(db) == []
