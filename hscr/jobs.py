"""Background jobs: generate, train and evaluate as child processes that outlive the app.

Each job lives in ``<runs_dir>/<id>/``:

- ``status.json``: written atomically under a file lock. Fields: ``id``, ``kind``, ``args``,
  ``command``, ``state`` (one of ``queued``, ``running``, ``succeeded``, ``failed``,
  ``cancelled``), ``pid`` (the supervisor, which leads the job's session), ``child_pid``,
  ``exit_code``, ``created_at``/``started_at``/``finished_at`` (ISO 8601, UTC), ``progress``
  (what the job reported: ``fraction``, ``step``, ``total``, ``eta_s``, ``message``) and ``error``.
- ``log.txt``: the job's stdout and stderr.
- ``metrics.jsonl``: written by training (``--output`` defaults to the run folder).
- ``cancel_requested``: present once :func:`cancel` was called.

A small supervisor process (``python -m hscr.jobs supervise RUN_DIR``) starts the command in its
own process group, waits for it and records the exit code, so the state stays right when the app
that started the job has exited or restarted. A job whose supervisor died without recording an
exit code (killed, out of memory) reads as ``failed`` (``cancelled`` after a cancel).

The app drives jobs only through these functions:

    from hscr import jobs
    job = jobs.start_job("train", ["--model", "data/demo/model"], runs_dir="data/runs")
    info = jobs.status(job.id, runs_dir="data/runs")   # state, progress, eta_s, log_tail, exit_code
    jobs.list_jobs("data/runs")                         # every job, newest first (re-attach)
    jobs.cancel(job.id, runs_dir="data/runs")           # SIGTERM to the tree, SIGKILL after a grace period

:func:`status` and :func:`list_jobs` return the fields of ``status.json``, changed and extended:

- ``progress``: the fraction done (0..1), 1.0 once succeeded, None before the first report.
- ``progress_detail``: the job's own progress record.
- ``eta_s``: the job's estimate, or one computed from the elapsed time.
- ``log_tail``: the last lines of ``log.txt``, as a list.
- ``cancel_requested``, ``run_dir`` and ``metrics_path``.

A job reports progress from inside with :func:`report_progress`, which does nothing outside a job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("data/runs")
JOB_KINDS = ("generate", "train", "evaluate")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
CANCEL_FILE = "cancel_requested"
JOB_DIR_ENV = "HSCR_JOB_DIR"
DEFAULT_GRACE_S = 30.0
LOG_TAIL_LINES = 20

# Supervisors started by this process, kept so that status() can reap them (no zombies).
_STARTED: dict[str, subprocess.Popen] = {}


@dataclass
class Job:
    """A started job: its id, kind and run folder."""

    id: str
    kind: str
    run_dir: Path
    pid: int | None = None

    def status(self) -> dict[str, Any]:
        return status(self.id, self.run_dir.parent)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


# -- status.json ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".status.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HSCRError(f"job not found: {run_dir} has no {STATUS_FILE}") from None
    except json.JSONDecodeError as exc:
        raise HSCRError(f"invalid {path}: {exc}") from None


def _write_status(run_dir: Path, data: dict[str, Any]) -> None:
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, run_dir / STATUS_FILE)


def _update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    with _locked(run_dir):
        data = _read_status(run_dir)
        data.update(fields)
        _write_status(run_dir, data)
    return data


# -- processes ------------------------------------------------------------------------------------


def _process_start_time(pid: int) -> str | None:
    """Return the kernel's start time of ``pid`` (clock ticks since boot), to detect a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces; the fields after it are space-separated.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int | None, start_time: str | None = None) -> bool:
    if not pid:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists() and Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return False
        state = text[text.rfind(")") + 2 :].split()[0]
        if state in ("Z", "X"):
            return False
        return start_time is None or _process_start_time(pid) == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int | None) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int | None, signum: int) -> None:
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _reap(job_id: str) -> None:
    process = _STARTED.get(job_id)
    if process is not None and process.poll() is not None:
        _STARTED.pop(job_id, None)


# -- public API -----------------------------------------------------------------------------------


def new_job_id(kind: str) -> str:
    return f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_command(kind: str, args: Sequence[str], num_processes: int = 1) -> list[str]:
    """Build the argv of ``python -m hscr KIND ARGS``, under ``accelerate launch`` for several processes."""
    if num_processes > 1:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "-m", "hscr", kind, *args,
        ]
    return [sys.executable, "-m", "hscr", kind, *args]


def start_job(
    kind: str,
    args: Sequence[str],
    runs_dir: str | Path = DEFAULT_RUNS_DIR,
    job_id: str | None = None,
    num_processes: int = 1,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> Job:
    """Start ``python -m hscr KIND ARGS`` as a background job in ``<runs_dir>/<job_id>/``.

    ``job_id`` may name a folder the caller prepared (config, Parquet snapshot); it must not hold
    an active job. For ``train``, ``--output`` defaults to the run folder, and ``--data`` to its
    ``preferences.parquet`` when neither ``--db`` nor ``--data`` is given. ``num_processes > 1``
    runs the command under ``accelerate launch``. ``command`` replaces the whole argv (any
    program; ``kind`` is then only a label).
    """
    if command is None and kind not in JOB_KINDS:
        raise HSCRError(f"unknown job kind {kind!r}; supported: {', '.join(JOB_KINDS)}")
    if num_processes < 1:
        raise HSCRError(f"invalid num_processes={num_processes}: expected an integer >= 1")
    runs_dir = Path(runs_dir)
    job_id = job_id or new_job_id(kind)
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise HSCRError(f"invalid job id {job_id!r}: expected a plain folder name")
    run_dir = runs_dir / job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()

    if (run_dir / STATUS_FILE).is_file():
        previous = status(job_id, runs_dir)
        if previous["state"] in ACTIVE_STATES:
            raise HSCRError(f"job {job_id} is still {previous['state']}; cancel it before starting it again")

    args = [str(a) for a in args]
    if command is None and kind == "train":
        if "--output" not in args:
            args += ["--output", str(run_dir)]
        snapshot = run_dir / "preferences.parquet"
        if "--db" not in args and "--data" not in args and snapshot.is_file():
            args += ["--data", str(snapshot)]
    argv = [str(a) for a in command] if command is not None else build_command(kind, args, num_processes)

    (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    with _locked(run_dir):
        _write_status(run_dir, {
            "id": job_id, "kind": kind, "args": args, "command": argv, "state": "queued",
            "created_at": _now(), "started_at": None, "finished_at": None, "pid": None,
            "child_pid": None, "child_pgid": None, "exit_code": None, "progress": {}, "error": None,
            "env": dict(env or {}), "cwd": os.getcwd(),
        })

    with open(run_dir / "supervisor.log", "ab") as supervisor_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hscr.jobs", "supervise", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=supervisor_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.getcwd(),
        )
    _STARTED[job_id] = process
    _update_status(run_dir, pid=process.pid)
    logger.info("started job %s (%s) with supervisor pid %d", job_id, kind, process.pid)
    return Job(id=job_id, kind=kind, run_dir=run_dir, pid=process.pid)


def status(job_id: str, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> dict[str, Any]:
    """Return the job's status: state, progress fraction, ETA, last log lines, exit code.

    A job still marked active whose supervisor is gone is marked failed (or cancelled) here.
    """
    run_dir = Path(runs_dir) / job_id
    _reap(job_id)
    data = _read_status(run_dir)
    if data.get("state") in ACTIVE_STATES:
        supervisor_gone = data.get("pid") and not _alive(data["pid"], data.get("pid_start_time"))
        # A queued job whose supervisor never registered counts as gone after a minute.
        never_started = data.get("pid") is None and (time.time() - (_parse_time(data.get("created_at")) or time.time())) > 60
        if supervisor_gone or never_started:
            with _locked(run_dir):
                data = _read_status(run_dir)
                if data.get("state") in ACTIVE_STATES:
                    cancelled = (run_dir / CANCEL_FILE).exists()
                    data["state"] = "cancelled" if cancelled else "failed"
                    data["finished_at"] = _now()
                    data["error"] = data.get("error") or (
                        "the job was cancelled" if cancelled
                        else "the job process ended without recording an exit code (killed or crashed)"
                    )
                    _write_status(run_dir, data)
            _signal_group(data.get("child_pgid"), signal.SIGKILL)
    return _summarize(run_dir, data)


def _summarize(run_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    progress = dict(data.get("progress") or {})
    fraction = progress.get("fraction")
    if data.get("state") == "succeeded":
        fraction = 1.0
    eta = progress.get("eta_s")
    started = _parse_time(data.get("started_at"))
    if eta is None and fraction and 0 < fraction < 1 and started and data.get("state") == "running":
        elapsed = time.time() - started
        eta = elapsed * (1 - fraction) / fraction
    return {
        **data,
        "run_dir": str(run_dir),
        "progress": fraction,
        "progress_detail": progress,
        "eta_s": eta,
        "log_tail": tail_log(run_dir),
        "cancel_requested": (run_dir / CANCEL_FILE).exists(),
        "metrics_path": str(run_dir / "metrics.jsonl"),
    }


def list_jobs(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> list[dict[str, Any]]:
    """Status of every job under ``runs_dir``, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for run_dir in runs_dir.iterdir():
        if (run_dir / STATUS_FILE).is_file():
            try:
                found.append(status(run_dir.name, runs_dir))
            except HSCRError as exc:
                logger.warning("skipping job folder %s: %s", run_dir, exc)
    return sorted(found, key=lambda s: s.get("created_at") or "", reverse=True)


def cancel(job_id: str, runs_dir: str | Path = DEFAULT_RUNS_DIR, grace_s: float = DEFAULT_GRACE_S) -> dict[str, Any]:
    """Stop the job's whole process tree: SIGTERM now, SIGKILL after ``grace_s`` seconds.

    Training saves a checkpoint on SIGTERM, so a cancelled run can resume with ``--resume``.
    The supervisor sends the signals and records the state; this process sends them too in case
    the supervisor is gone. Returns the status right after SIGTERM.
    """
    run_dir = Path(runs_dir) / job_id
    info = status(job_id, runs_dir)
    if info["state"] not in ACTIVE_STATES:
        return info
    (run_dir / CANCEL_FILE).write_text(json.dumps({"requested_at": _now(), "grace_s": grace_s}), encoding="utf-8")
    pid = info.get("pid")
    if pid and _alive(pid, info.get("pid_start_time")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the supervisor forwards it to the job's process group
    else:
        _signal_group(info.get("child_pgid"), signal.SIGTERM)
    logger.info("cancel requested for job %s", job_id)

    def escalate() -> None:
        deadline = time.time() + grace_s + 5.0
        while time.time() < deadline:
            if not _group_alive(info.get("child_pgid")) and not _alive(pid, info.get("pid_start_time")):
                return
            time.sleep(0.2)
        _signal_group(info.get("child_pgid"), signal.SIGKILL)
        if pid and _alive(pid, info.get("pid_start_time")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    threading.Thread(target=escalate, name=f"cancel-{job_id}", daemon=True).start()
    return status(job_id, runs_dir)


def wait(job_id: str, runs_dir: str | Path = DEFAULT_RUNS_DIR, timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any]:
    """Poll until the job is no longer active; raises ``TimeoutError`` after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        info = status(job_id, runs_dir)
        if info["state"] not in ACTIVE_STATES:
            return info
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {info['state']} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def tail_log(run_dir: str | Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """Return the last ``lines`` lines of the job's log, reading at most its last 64 KiB."""
    path = Path(run_dir) / LOG_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    # tqdm redraws with carriage returns; keep the last state of each line.
    rows = [line.split("\r")[-1] for line in text.splitlines()]
    return [row for row in rows if row.strip()][-lines:]


def report_progress(
    fraction: float | None = None,
    step: int | None = None,
    total: int | None = None,
    eta_s: float | None = None,
    message: str | None = None,
) -> None:
    """Record the running job's progress in its ``status.json``; a no-op outside a job."""
    run_dir = os.environ.get(JOB_DIR_ENV)
    if not run_dir or not (Path(run_dir) / STATUS_FILE).is_file():
        return
    progress = {"fraction": fraction, "step": step, "total": total, "eta_s": eta_s, "message": message,
                "updated_at": _now()}
    try:
        _update_status(Path(run_dir), progress={k: v for k, v in progress.items() if v is not None})
    except (OSError, HSCRError) as exc:
        logger.warning("could not record job progress in %s: %s", run_dir, exc)


# -- the supervisor -------------------------------------------------------------------------------


def supervise(run_dir: str | Path) -> int:
    """Run the job's command, forward cancel signals to its process group and record the outcome."""
    run_dir = Path(run_dir)
    data = _read_status(run_dir)
    env = {**os.environ, **data.get("env", {}), JOB_DIR_ENV: str(run_dir), "PYTHONUNBUFFERED": "1"}
    stopping = {"at": None}

    def on_term(signum: int, frame: Any) -> None:
        if stopping["at"] is None:
            stopping["at"] = time.time()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    with open(run_dir / LOG_FILE, "ab") as log:
        try:
            # The job gets its own process group, so the whole tree can be signalled at once.
            child = subprocess.Popen(
                data["command"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=data.get("cwd") or None, process_group=0,
            )
        except OSError as exc:
            _update_status(run_dir, state="failed", finished_at=_now(), error=f"could not start {data['command'][0]}: {exc}")
            return 1
        _update_status(
            run_dir, state="running", started_at=_now(), pid=os.getpid(),
            pid_start_time=_process_start_time(os.getpid()), child_pid=child.pid, child_pgid=child.pid,
        )
        if (run_dir / CANCEL_FILE).exists():
            stopping["at"] = time.time()  # cancelled while queued

        forwarded = killed = False
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if stopping["at"] is not None and not forwarded:
                _signal_group(child.pid, signal.SIGTERM)
                forwarded = True
            if forwarded and not killed and time.time() - stopping["at"] > _grace(run_dir):
                _signal_group(child.pid, signal.SIGKILL)
                killed = True
        # Whatever the job left behind in its group goes with it.
        _signal_group(child.pid, signal.SIGKILL)

    cancelled = (run_dir / CANCEL_FILE).exists()
    if cancelled:
        state = "cancelled"
    elif code == 0:
        state = "succeeded"
    else:
        state = "failed"
    error = None
    if state == "failed":
        error = f"exit code {code}" + (f" ({_signal_text(-code)})" if code < 0 else "")
    _update_status(run_dir, state=state, exit_code=code, finished_at=_now(), error=error)
    return 0


def _signal_text(signum: int) -> str:
    """Describe the signal that ended a job, naming the usual sender of SIGKILL."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    text = f"signal {signum}, {name}"
    if signum == signal.SIGKILL:
        text += ": killed from outside, for example by the out-of-memory killer"
    return text


def _grace(run_dir: Path) -> float:
    try:
        return float(json.loads((run_dir / CANCEL_FILE).read_text(encoding="utf-8")).get("grace_s", DEFAULT_GRACE_S))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_GRACE_S


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        sys.exit(supervise(sys.argv[2]))
    print("usage: python -m hscr.jobs supervise RUN_DIR", file=sys.stderr)
    sys.exit(2)
