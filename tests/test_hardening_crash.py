"""Crash safety with real processes and signals: training jobs, the app, and an unwritable data folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from browser import AppProcess
from hardening_support import consistency_problems, seed_review_db
from hscr import jobs
from hscr.store import Store

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout=120.0, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout:.0f} s")


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    # Job supervisors run `python -m hscr.jobs` from the test's working directory.
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# -- training jobs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    from hscr.preferences import write_preferences_parquet
    from train_support import make_rows

    rows = make_rows(tmp_path / "images", count=8)           # 4 steps per epoch at batch size 2
    runs = tmp_path / "runs"
    for name in ("full", "cut"):
        write_preferences_parquet(rows, runs / name / "preferences.parquet")
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--set", "max_steps=24", "--set", "batch_size=2",
            "--set", "lora_r=4", "--set", "lora_dropout=0.1", "--set", "learning_rate=5e-3",
            "--set", "save_steps=3", "--set", "epochs=10"]
    # One thread each keeps the floating-point sums of both processes in the same order.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    full = jobs.start_job("train", args, runs, job_id="full", env=env)
    cut = jobs.start_job("train", args, runs, job_id="cut", env=env)

    # SIGKILL only the training process, as the out-of-memory killer would, in the middle of epoch 2.
    wait_for(lambda: (jobs.status(cut.id, runs)["progress_detail"].get("step") or 0) >= 5, timeout=300, poll=0.02)
    killed_at = jobs.status(cut.id, runs)
    os.kill(killed_at["child_pid"], signal.SIGKILL)
    failed = jobs.wait(cut.id, runs, timeout_s=60)

    assert failed["state"] == "failed"
    assert failed["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in failed["error"]
    assert any("train" in line for line in failed["log_tail"])
    assert not (runs / "cut" / "adapter").exists()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (runs / "cut").glob("checkpoint-*"))
    assert checkpoints
    assert checkpoints[-1] % 3 == 0
    assert checkpoints[-1] < 24

    resumed = jobs.start_job("train", args + ["--resume"], runs, job_id="cut", env=env)
    assert jobs.wait(resumed.id, runs, timeout_s=300)["state"] == "succeeded"
    assert jobs.wait(full.id, runs, timeout_s=300)["state"] == "succeeded"

    full_weights = load_file(str(runs / "full" / "adapter" / "adapter_model.safetensors"))
    cut_weights = load_file(str(runs / "cut" / "adapter" / "adapter_model.safetensors"))
    assert full_weights.keys() == cut_weights.keys()
    worst = max((full_weights[k] - cut_weights[k]).abs().max().item() for k in full_weights)
    assert worst <= 1e-6
    moved = max(full_weights[k].abs().max().item() for k in full_weights if "lora_B" in k)
    assert moved > 0                                           # training changed the adapter
    steps = [json.loads(line)["step"] for line in (runs / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


@pytest.mark.slow
def test_vanished_job_is_failed_with_log_tail(tmp_path, tiny_model_dir):
    from gradio_client import Client

    db = tmp_path / "data" / "hscr.duckdb"
    seed_review_db(db, tmp_path, num_samples=1)
    runs = tmp_path / "data" / "runs"                          # the app's job folder
    job = jobs.start_job("train", [], runs, command=[sys.executable, "-c", textwrap.dedent("""
        import time
        for step in range(3):
            print(f"step {step} done", flush=True)
        time.sleep(120)
    """)])
    wait_for(lambda: "step 2 done" in jobs.tail_log(job.run_dir), timeout=60)
    info = jobs.status(job.id, runs)

    # The whole job disappears at once: the supervisor and the process group it leads.
    os.killpg(info["child_pgid"], signal.SIGKILL)
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: jobs.status(job.id, runs)["state"] != "running", timeout=30)

    # A fresh process, as the app after a restart, reads the same outcome.
    code = f"import json; from hscr import jobs; print(json.dumps(jobs.status({job.id!r}, {str(runs)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["state"] == "failed"
    assert "killed or crashed" in seen["error"]
    assert seen["log_tail"][-3:] == ["step 0 done", "step 1 done", "step 2 done"]

    # The app's training tab shows it the same way.
    with AppProcess(db, tiny_model_dir) as app:
        client = Client(app.url, verbose=False)
        client.predict(api_name="/initial_view")               # the page load that lists the runs
        status_line, _, log_tail, _ = client.predict(job.id, api_name="/job_view")
    assert "state **failed**" in status_line
    assert "killed or crashed" in status_line
    assert log_tail.splitlines()[-3:] == ["step 0 done", "step 1 done", "step 2 done"]


# -- the app --------------------------------------------------------------------------------------


def review_writer(url: str, sample_ids: list[str], name: str, acknowledged: list, stop: threading.Event) -> None:
    """Write notes and edits until the app dies; record each text whose call returned."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    number = 0
    while not stop.is_set():
        text = f"{name}-{number}"
        sample = sample_ids[number % len(sample_ids)]
        api = "/add_note" if number % 2 else "/save_chosen_edit"
        try:
            client.predict(sample, text, api_name=api)
        except Exception:
            return                                               # the app was killed
        acknowledged.append(text)
        number += 1


@pytest.mark.slow
def test_sigkill_app_keeps_acknowledged_reviews(tmp_path, tiny_model_dir):
    from gradio_client import Client

    db = tmp_path / "data" / "hscr.duckdb"
    samples = seed_review_db(db, tmp_path)
    sample_ids = list(samples)
    app = AppProcess(db, tiny_model_dir).start()
    acknowledged: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=review_writer, args=(app.url, sample_ids, f"w{k}", acknowledged, stop))
               for k in range(4)]
    try:
        for writer in writers:
            writer.start()
        wait_for(lambda: len(acknowledged) >= 40, timeout=180)
        os.killpg(app.process.pid, signal.SIGKILL)               # mid-write: calls are in flight
        app.process.wait(30)
    finally:
        stop.set()
        for writer in writers:
            writer.join(60)
        app.stop()
    before_restart = list(acknowledged)

    restarted = AppProcess(db, tiny_model_dir).start()
    try:
        client = Client(restarted.url, verbose=False)
        shown = set()
        for position in range(1, len(sample_ids) + 1):
            result = client.predict("(all)", "(all)", position, api_name="/review_view")
            history = result[9]
            shown.update(row[history["headers"].index("details")] for row in history["data"])
    finally:
        restarted.stop()
    assert set(before_restart) <= shown

    assert consistency_problems(db) == []
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT payload_json FROM reviews")
    texts = [json.loads(row["payload_json"])["text"] for row in rows]
    assert len(texts) == len(set(texts))                         # no write was applied twice
    assert set(before_restart) <= set(texts)
    assert all(text.startswith("w") and text.split("-")[1].isdigit() for text in texts)


# -- an unwritable data folder --------------------------------------------------------------------


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


@pytest.mark.slow
def test_read_only_data_folder_serves_reads(tmp_path, tiny_model_dir):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from hardening_support import PrefixedApp, without_root_override
    from support import random_image

    db = tmp_path / "data" / "hscr.duckdb"
    samples = seed_review_db(db, tmp_path, num_samples=2)
    sample = next(iter(samples))
    upload = tmp_path / "new.png"
    random_image(5).save(upload)
    make_read_only(tmp_path / "data")
    prefix = without_root_override()

    # The command line names the problem and exits.
    cli = subprocess.run([*prefix, sys.executable, "-m", "hscr", "import", "folder", str(tmp_path / "seed-images"),
                          "--db", str(db)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 2
    assert "read-only" in cli.stderr
    assert "Traceback" not in cli.stderr

    app = PrefixedApp(db, tiny_model_dir, prefix)
    app.log_path = tmp_path / "app.log"                       # the data folder takes no log file
    with app:
        client = Client(app.url, verbose=False)
        view = client.predict("(all)", "(all)", 1, api_name="/review_view")
        assert view[0] in samples
        with pytest.raises(AppError, match="read-only"):
            client.predict(sample, "edited while read-only", api_name="/save_chosen_edit")
        report = client.predict([handle_file(str(upload))], "uploads", "train", "is it new ?", "yes",
                                api_name="/upload_files")
        assert "imported 0 samples" in report
        assert "error:" in report
        counts = client.predict("(all)", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[1]
        assert "**2** samples match" in counts
        assert app.process.poll() is None
    assert "serving the data read-only" in app.log()
    with Store(db, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM reviews")[0]["n"] == 0


@pytest.mark.slow
def test_full_data_folder_serves_reads(tmp_path, tiny_model_dir):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from hardening_support import PrefixedApp, tmpfs_prefix
    from support import random_image

    seed = tmp_path / "seed"
    samples = seed_review_db(seed / "hscr.duckdb", tmp_path, num_samples=2)
    sample = next(iter(samples))
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    prefix = tmpfs_prefix(mount_point, seed, size_mb=32)
    if prefix is None:
        pytest.skip("unprivileged user and mount namespaces are not available, so no small disk can be mounted")
    upload = tmp_path / "new.png"
    random_image(5).save(upload)

    app = PrefixedApp(mount_point / "hscr.duckdb", tiny_model_dir, prefix)
    app.log_path = tmp_path / "app.log"
    with app:
        # The test sees the app's tmpfs through the process's root in its mount namespace.
        data = Path(f"/proc/{app.process.pid}/root") / mount_point.relative_to("/")
        client = Client(app.url, verbose=False)
        client.predict(sample, "saved before the disk filled", api_name="/save_chosen_edit")
        filler = data / "filler"
        with open(filler, "wb", buffering=0) as handle:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    handle.write(b"\0" * (1 << 20))

        # The last page of the write-ahead log may still take a few small commits.
        acknowledged, failure = [], None
        for number in range(200):
            try:
                client.predict(sample, f"written on a full disk {number}", api_name="/save_chosen_edit")
            except AppError as exc:
                failure = str(exc)
                break
            acknowledged.append(f"written on a full disk {number}")
        assert failure is not None
        assert "No space left on device" in failure
        assert "nothing of this change was saved" in failure
        # NOTE: Gradio's own upload route answers a full disk with HTTP 500 and no message; the app
        # keeps running, and nothing reaches the database.
        with pytest.raises(httpx.HTTPStatusError, match="500"):
            client.predict([handle_file(str(upload))], "uploads", "train", "is it new ?", "yes",
                           api_name="/upload_files")
        counts = client.predict("(all)", "(all)", "(all)", "(all)", "(all)", 1, api_name="/browse")[1]
        assert "**2** samples match" in counts
        # NOTE: Gradio writes every image it sends into its cache, so views with an image fail until
        # space is freed; tables and text keep working.
        with pytest.raises(AppError, match="No space left on device"):
            client.predict("(all)", "(all)", 1, api_name="/review_view")

        filler.unlink()
        view = client.predict("(all)", "(all)", 1, api_name="/review_view")
        assert view[0] in samples
        client.predict(sample, "saved after space was freed", api_name="/save_chosen_edit")
        position = 1 if view[0] == sample else 2
        history = client.predict("(all)", "(all)", position, api_name="/review_view")[9]
        details = [row[history["headers"].index("details")] for row in history["data"]]
        assert app.process.poll() is None
    assert details == ["saved before the disk filled", *acknowledged, "saved after space was freed"]
