"""``python -m hscr jobs list|status ID|cancel ID``: look at and stop background jobs.

    python -m hscr jobs list --runs-dir data/runs
    python -m hscr jobs status train-20260101-120000-ab12 --json
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("jobs", help="list, inspect or cancel background jobs")
    parser.add_argument("action", choices=["list", "status", "cancel"], help="list all jobs, show one job's status, or cancel one job")
    parser.add_argument("job_id", nargs="?", metavar="ID", help="job id (for status and cancel)")
    parser.add_argument("--runs-dir", default="data/runs", help="folder of the job folders (default data/runs)")
    parser.add_argument("--grace", type=float, default=30.0, help="cancel: seconds between SIGTERM and SIGKILL")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=main)


def _line(info: dict) -> str:
    fraction = info.get("progress")
    progress = f"{100 * fraction:5.1f}%" if fraction is not None else "    - "
    eta = f"eta {info['eta_s']:.0f}s" if info.get("eta_s") is not None else ""
    return f"{info['id']:<36} {info['kind']:<9} {info['state']:<10} {progress} {eta}".rstrip()


def main(args: argparse.Namespace) -> int:
    from hscr import jobs
    from hscr.errors import HSCRError

    if args.action == "list":
        found = jobs.list_jobs(args.runs_dir)
        if args.json:
            print(json.dumps(found, indent=2))
        elif not found:
            print(f"no jobs in {args.runs_dir}")
        for info in [] if args.json else found:
            print(_line(info))
        return 0

    if not args.job_id:
        raise HSCRError(f"jobs {args.action} needs a job id; list them with `python -m hscr jobs list`")
    if args.action == "cancel":
        info = jobs.cancel(args.job_id, args.runs_dir, grace_s=args.grace)
        # This command exits at once, so it waits for the supervisor to finish the cancel.
        info = jobs.wait(args.job_id, args.runs_dir, timeout_s=args.grace + 30)
    else:
        info = jobs.status(args.job_id, args.runs_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(_line(info))
    if info.get("exit_code") is not None:
        print(f"exit code {info['exit_code']}")
    if info.get("error"):
        print(f"error: {info['error']}")
    for line in info.get("log_tail") or []:
        print(f"  | {line}")
    return 0
