"""Users file and login check: bcrypt hashes, the management command, bad files."""

import json
import os
import subprocess
import sys

import bcrypt
import pytest

from app.auth import PasswordCheck, check_password, hash_password, read_users, write_users
from browser import REPO
from hscr.errors import HSCRError


def test_hash_round_trip():
    hashed = hash_password("correct horse", rounds=4)
    assert hashed.startswith("$2")
    assert bcrypt.checkpw(b"correct horse", hashed.encode())
    users = {"alice": hashed}
    assert check_password(users, "alice", "correct horse")
    assert not check_password(users, "alice", "wrong horse!")
    assert not check_password(users, "bob", "correct horse")


def test_hash_rejects_short_and_long_passwords():
    with pytest.raises(HSCRError, match="too short"):
        hash_password("short", rounds=4)
    with pytest.raises(HSCRError, match="72 bytes"):
        hash_password("x" * 73, rounds=4)


def test_users_file_written_private(tmp_path):
    path = tmp_path / "users.json"
    write_users(path, {"bob": hash_password("password-b", rounds=4), "alice": hash_password("password-a", rounds=4)})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert list(json.loads(path.read_text())["users"]) == ["alice", "bob"]
    assert set(read_users(path)) == {"alice", "bob"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "invalid users file"),
        ('{"people": {}}', "expected"),
        ('{"users": {"alice": "plaintext"}}', "bcrypt hash"),
        ('{"users": {"bad name": "$2b$12$abc"}}', "bad name"),
    ],
)
def test_read_users_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "users.json"
    path.write_text(content)
    with pytest.raises(HSCRError, match=message):
        read_users(path)


def test_read_users_missing_file_names_fix(tmp_path):
    with pytest.raises(HSCRError, match="python -m app.auth add USER"):
        read_users(tmp_path / "none.json")


def test_password_check_reloads_changed_file(tmp_path):
    path = tmp_path / "users.json"
    write_users(path, {"alice": hash_password("password-a", rounds=4)})
    check = PasswordCheck(path)
    assert check("alice", "password-a")
    assert not check("carol", "password-c")
    write_users(path, {"alice": hash_password("password-a", rounds=4), "carol": hash_password("password-c", rounds=4)})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10_000_000))
    assert check("carol", "password-c")
    path.write_text("broken")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 20_000_000))
    assert not check("alice", "password-a")


def run_auth(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "app.auth", *args], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_auth_command_add_list_remove(tmp_path):
    path = tmp_path / "users.json"
    added = run_auth("add", "dr.smith", "--file", str(path), "--password-stdin", stdin="long enough password\n")
    assert added.returncode == 0, added.stderr
    assert check_password(read_users(path), "dr.smith", "long enough password")

    listed = run_auth("list", "--file", str(path))
    assert listed.stdout.split() == ["dr.smith"]

    short = run_auth("add", "nurse", "--file", str(path), "--password-stdin", stdin="short\n")
    assert short.returncode == 2
    assert short.stderr.startswith("error: the password is too short")
    assert "Traceback" not in short.stderr

    removed = run_auth("remove", "dr.smith", "--file", str(path))
    assert removed.returncode == 0
    assert read_users(path) == {}
    missing = run_auth("remove", "dr.smith", "--file", str(path))
    assert missing.returncode == 2
    assert "not found" in missing.stderr
