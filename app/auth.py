"""Users file with bcrypt password hashes, and the login check the app hands to Gradio.

The file is JSON: ``{"users": {"alice": "$2b$12$..."}}``. Manage it with

    python -m app.auth add alice --file data/users.json      # prompts for the password twice
    python -m app.auth remove alice --file data/users.json
    python -m app.auth list --file data/users.json

and start the app with ``python app.py --auth data/users.json``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import bcrypt

from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8


def read_users(path: str | Path) -> dict[str, str]:
    """Read a users file; returns user name -> bcrypt hash."""
    path = Path(path)
    if not path.is_file():
        raise HSCRError(f"users file not found: {path}; create it with `python -m app.auth add USER --file {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HSCRError(f"invalid users file {path}: {exc}") from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise HSCRError(f'invalid users file {path}: expected {{"users": {{"name": "bcrypt hash"}}}}')
    for name, hashed in users.items():
        if not USER_NAME.match(str(name)) or not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise HSCRError(f"invalid users file {path}: entry {name!r} needs a user name and a bcrypt hash")
    return dict(users)


def write_users(path: str | Path, users: dict[str, str]) -> None:
    """Write the users file atomically, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"users": dict(sorted(users.items()))}, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def hash_password(password: str, rounds: int = 12) -> str:
    """Hash a password with bcrypt; ``rounds`` is the log2 cost factor (bcrypt's default is 12)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise HSCRError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    # bcrypt only reads the first 72 bytes of a password.
    if len(password.encode("utf-8")) > 72:
        raise HSCRError("the password is too long: bcrypt uses at most 72 bytes")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def check_password(users: dict[str, str], user: str, password: str) -> bool:
    """Return whether ``password`` matches the stored hash of ``user``."""
    hashed = users.get(user)
    if hashed is None:
        logger.warning("login failed: unknown user %r", user)
        return False
    try:
        matched = bcrypt.checkpw(password.encode("utf-8")[:72], hashed.encode("ascii"))
    except ValueError:
        logger.error("login failed: the stored hash of user %r is invalid", user)
        return False
    if not matched:
        logger.warning("login failed: wrong password for user %r", user)
    return matched


class PasswordCheck:
    """The ``auth`` callable for ``gr.Blocks.launch``: checks a login against the users file.

    The file is read again when it changes, so added users can log in without a restart.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mtime = 0.0
        self._users: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        mtime = self.path.stat().st_mtime if self.path.exists() else 0.0
        if mtime != self._mtime:
            self._users = read_users(self.path)
            self._mtime = mtime

    def __call__(self, user: str, password: str) -> bool:
        try:
            self._reload()
        except HSCRError as exc:
            logger.error("login failed: %s", exc)
            return False
        return check_password(self._users, user, password)


class HideApiInfoFromLogin:
    """ASGI middleware that blanks the API description on the login page.

    Gradio 6.31 guards ``/config`` and every API route with the login, but its ``/`` route
    embeds ``window.gradio_api_info`` (every endpoint with its dropdown choices, such as dataset
    names) even in the login page it serves to anonymous visitors.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") not in ("GET", "HEAD") or scope.get("path") != "/":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            content = bytes(body)
            if b'"auth_required":true' in content.replace(b" ", b""):
                content = _API_INFO.sub(b"window.gradio_api_info = null;</script>", content)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(content)).encode("ascii")))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": content if scope["method"] == "GET" else b""})

        await self.app(scope, receive, capture)


_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.DOTALL)


def anonymous_page_middleware() -> Any:
    """Return the middleware entry for ``launch(app_kwargs={"middleware": [...]})``."""
    from starlette.middleware import Middleware

    return Middleware(HideApiInfoFromLogin)


def _read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    second = getpass.getpass("repeat password: ")
    if first != second:
        raise HSCRError("the two passwords differ; run the command again")
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.auth", description="Manage the users file of the app's login.")
    parser.add_argument("action", choices=["add", "remove", "list"], help="add or update a user, remove one, or list names")
    parser.add_argument("user", nargs="?", help="user name (letters, digits, _ . @ -)")
    parser.add_argument("--file", default="data/users.json", help="users file (default data/users.json)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    args = parser.parse_args(argv)
    path = Path(args.file)
    try:
        users = read_users(path) if path.exists() else {}
        if args.action == "list":
            for name in sorted(users):
                print(name)
            return 0
        if not args.user or not USER_NAME.match(args.user):
            raise HSCRError(f"invalid user name {args.user!r}: use 1-64 letters, digits, _ . @ or -")
        if args.action == "remove":
            if args.user not in users:
                raise HSCRError(f"user {args.user!r} not found in {path}")
            del users[args.user]
        else:
            users[args.user] = hash_password(_read_new_password(args.password_stdin))
        write_users(path, users)
    except HSCRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.action} {args.user}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
