"""Background jobs as real child processes: states, progress, cancel of the whole tree, re-attach."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hscr import jobs
from hscr.errors import HSCRError

REPO = Path(__file__).resolve().parents[1]


def python_job(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_for(predicate, timeout=30.0, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    # The supervisor runs `python -m hscr.jobs`; make the package importable from any cwd.
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_succeeded_job_records_progress_and_exit_code(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        from hscr.jobs import report_progress
        print("hello from the job", flush=True)
        report_progress(fraction=0.5, step=1, total=2, message="half way")
    """))

    info = jobs.wait(job.id, tmp_path, timeout_s=60)

    assert info["state"] == "succeeded"
    assert info["exit_code"] == 0
    assert info["progress"] == 1.0
    assert info["progress_detail"]["message"] == "half way"
    assert "hello from the job" in info["log_tail"]
    assert info["finished_at"] is not None


def test_running_job_shows_progress_and_eta(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import time
        from hscr.jobs import report_progress
        report_progress(fraction=0.25, step=1, total=4)
        time.sleep(60)
    """))
    try:
        info = wait_for(lambda: (s := jobs.status(job.id, tmp_path))["progress"] == 0.25 and s)
        assert info["state"] == "running"
        assert info["eta_s"] is not None
        assert info["eta_s"] >= 0
        assert info["pid"] > 0
    finally:
        jobs.cancel(job.id, tmp_path, grace_s=1)
    assert jobs.wait(job.id, tmp_path, timeout_s=30)["state"] == "cancelled"


def test_crashed_job_is_failed_with_log_tail(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import sys
        print("loading", flush=True)
        raise RuntimeError("weights file is corrupt")
    """))

    info = jobs.wait(job.id, tmp_path, timeout_s=60)

    assert info["state"] == "failed"
    assert info["exit_code"] == 1
    assert any("weights file is corrupt" in line for line in info["log_tail"])
    assert "exit code 1" in info["error"]


def test_cancel_stops_whole_tree(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("grandchild", grandchild.pid, flush=True)
        time.sleep(120)
    """))
    line = wait_for(lambda: [l for l in jobs.tail_log(job.run_dir) if l.startswith("grandchild")])
    grandchild = int(line[0].split()[1])
    info = jobs.status(job.id, tmp_path)
    child = info["child_pid"]
    assert pid_alive(grandchild)
    assert pid_alive(child)

    jobs.cancel(job.id, tmp_path, grace_s=5)
    info = jobs.wait(job.id, tmp_path, timeout_s=30)

    assert info["state"] == "cancelled"
    assert info["cancel_requested"]
    wait_for(lambda: not pid_alive(grandchild), timeout=10)
    wait_for(lambda: not pid_alive(child), timeout=10)


def test_cancel_escalates_to_sigkill(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(120)
    """))
    wait_for(lambda: "ignoring SIGTERM" in jobs.tail_log(job.run_dir))
    started = time.time()

    jobs.cancel(job.id, tmp_path, grace_s=1)
    info = jobs.wait(job.id, tmp_path, timeout_s=30)

    assert info["state"] == "cancelled"
    assert info["exit_code"] == -signal.SIGKILL
    assert time.time() - started < 20


def test_killed_supervisor_shows_failed_and_reattaches(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import time
        print("working", flush=True)
        time.sleep(120)
    """))
    wait_for(lambda: "working" in jobs.tail_log(job.run_dir))
    info = jobs.status(job.id, tmp_path)

    # Simulate an out-of-memory kill of the whole session.
    os.killpg(info["child_pgid"], signal.SIGKILL)
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(info["child_pid"]), timeout=10)

    # A fresh process (the app after a restart) reads the same state.
    code = (
        "import json, sys; from hscr import jobs; "
        f"print(json.dumps(jobs.list_jobs({str(tmp_path)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    listed = json.loads(out.stdout)
    assert [j["id"] for j in listed] == [job.id]
    assert listed[0]["state"] == "failed"
    assert "working" in listed[0]["log_tail"]
    assert jobs.status(job.id, tmp_path)["state"] == "failed"


def test_reattach_to_running_job_from_other_process(tmp_path):
    job = jobs.start_job("script", [], tmp_path, command=python_job("""
        import time
        time.sleep(120)
    """))
    wait_for(lambda: jobs.status(job.id, tmp_path)["state"] == "running")
    code = (
        "import json; from hscr import jobs; "
        f"print(json.dumps(jobs.cancel({job.id!r}, {str(tmp_path)!r}, grace_s=2)['state']))"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert jobs.wait(job.id, tmp_path, timeout_s=30)["state"] == "cancelled"


def test_start_rejects_unknown_kind_and_active_job(tmp_path):
    with pytest.raises(HSCRError, match="unknown job kind"):
        jobs.start_job("dance", [], tmp_path)
    job = jobs.start_job("script", [], tmp_path, job_id="fixed", command=python_job("import time; time.sleep(60)"))
    try:
        with pytest.raises(HSCRError, match="still"):
            jobs.start_job("script", [], tmp_path, job_id="fixed", command=python_job("pass"))
    finally:
        jobs.cancel(job.id, tmp_path, grace_s=1)
    jobs.wait(job.id, tmp_path, timeout_s=30)


@pytest.mark.slow
def test_train_job_defaults_output_and_data(tmp_path):
    run_dir = tmp_path / "prepared"
    run_dir.mkdir()
    (run_dir / "preferences.parquet").write_bytes(b"")
    # `hscr train` fails at once on the bad model path, but the job records the full argv first.
    job = jobs.start_job("train", ["--model", str(tmp_path / "no-model")], tmp_path, job_id="prepared")
    info = jobs.wait(job.id, tmp_path, timeout_s=120)
    assert info["args"][-4:] == ["--output", str(run_dir.resolve()), "--data", str(run_dir.resolve() / "preferences.parquet")]
    assert info["command"][1:4] == ["-m", "hscr", "train"]
    assert info["state"] == "failed"
    assert info["exit_code"] == 2
    assert any(line.startswith("error:") for line in info["log_tail"])


def test_list_jobs_empty_folder(tmp_path):
    assert jobs.list_jobs(tmp_path / "none") == []
    with pytest.raises(HSCRError, match="job not found"):
        jobs.status("missing", tmp_path)


@pytest.mark.slow
def test_cancelled_train_job_checkpoints_and_resumes(tmp_path, monkeypatch):
    from hscr.preferences import write_preferences_parquet
    from support import save_tiny_model
    from train_support import make_rows

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "runs" / "t1"
    write_preferences_parquet(make_rows(tmp_path / "images", count=4), run_dir / "preferences.parquet")
    args = ["--model", str(model_dir), "--device", "cpu", "--set", "max_steps=500", "--set", "batch_size=2",
            "--set", "lora_r=4", "--set", "save_steps=1000"]

    job = jobs.start_job("train", args, tmp_path / "runs", job_id="t1")
    wait_for(lambda: (jobs.status(job.id, tmp_path / "runs")["progress_detail"].get("step") or 0) >= 2, timeout=180)
    jobs.cancel(job.id, tmp_path / "runs", grace_s=60)
    info = jobs.wait(job.id, tmp_path / "runs", timeout_s=120)

    assert info["state"] == "cancelled"
    assert info["exit_code"] == 143
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 500

    resumed = jobs.start_job("train", args + ["--resume", "--set", f"max_steps={step + 2}"], tmp_path / "runs", job_id="t1")
    info = jobs.wait(resumed.id, tmp_path / "runs", timeout_s=180)
    assert info["state"] == "succeeded", info["log_tail"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_jobs_command_status_and_cancel(tmp_path):
    job = jobs.start_job("script", [], tmp_path, job_id="cli-job", command=python_job("""
        import time
        print("busy", flush=True)
        time.sleep(120)
    """))
    wait_for(lambda: "busy" in jobs.tail_log(job.run_dir))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    listed = subprocess.run([sys.executable, "-m", "hscr", "jobs", "list", "--runs-dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0
    assert "cli-job" in listed.stdout
    assert "running" in listed.stdout

    cancelled = subprocess.run([sys.executable, "-m", "hscr", "jobs", "cancel", "cli-job", "--runs-dir",
                                str(tmp_path), "--grace", "2", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "cancelled"

    missing = subprocess.run([sys.executable, "-m", "hscr", "jobs", "status", "nope", "--runs-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2
    assert "error: job not found" in missing.stderr
