"""Command line of ``python app.py``: parse options, prepare the data folder, launch the UI.

    python app.py                                   # demo model and data, http://127.0.0.1:7860
    python app.py --model data/llava-med --db data/hscr.duckdb --auth data/users.json

Privacy defaults: the server binds 127.0.0.1, a public share link opens only with ``--share``,
uploads are capped by ``--max-upload-mb``, and Gradio's file cache lives in the data folder, so
the server hands out no file from outside it. Gradio's telemetry and version check are off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from hscr.errors import HSCRError

logger = logging.getLogger(__name__)

SHARE_WARNING = (
    "WARNING: --share opens a public gradio.live link to this app. Medical images may contain "
    "patient data (burned-in text, faces, rare findings): share only de-identified data, and use "
    "--auth so that a login is required."
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="Start the HSCR Studio app.")
    parser.add_argument("--model", help="model folder or hub id (default: the demo model, built on first start)")
    parser.add_argument("--db", default="data/hscr.duckdb", help="DuckDB file; its folder is the data folder (default data/hscr.duckdb)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USERS_FILE", help="require a login checked against this users file (see python -m app.auth)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless given)")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest accepted upload in MB (default 200)")
    parser.add_argument("--device", default="auto", help="device for the token view: auto, cpu or cuda (default auto)")
    parser.add_argument("--no-demo", action="store_true", help="do not build the demo when --model is not given")
    return parser


def prepare_environment(data_dir: Path) -> None:
    """Point Gradio's cache into the data folder and turn off its network calls; call before importing gradio."""
    cache = data_dir / "cache" / "gradio"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # A read-only data folder can still be browsed; the cache then lives in a private temporary folder.
        cache = Path(tempfile.mkdtemp(prefix="hscr-gradio-"))
        logger.warning("cannot create the Gradio cache in %s (%s); using %s", data_dir, exc.strerror, cache)
    os.environ["GRADIO_TEMP_DIR"] = str(cache.resolve())
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model(db_path: Path, build_demo: bool) -> str:
    """Return the demo model folder, building the demo model and datasets on first start."""
    demo_model = db_path.parent / "demo" / "model"
    if not build_demo:
        if not (demo_model / "config.json").is_file():
            raise HSCRError(f"no --model given and no demo model in {demo_model}; pass --model or drop --no-demo")
        return str(demo_model)
    from hscr.demo import ensure_demo

    logger.info("preparing the demo model and datasets in %s (built on first start only)", db_path.parent)
    result = ensure_demo(db_path.parent, db_path=db_path)
    return str(result["model_dir"])


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db_path = Path(args.db)
    data_dir = db_path.parent
    try:
        if args.max_upload_mb < 1:
            raise HSCRError(f"invalid --max-upload-mb {args.max_upload_mb}: expected a whole number of MB >= 1")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HSCRError(f"cannot create the data folder {data_dir}: {exc.strerror}; choose another --db") from None
        prepare_environment(data_dir)
        model = args.model or default_model(db_path, build_demo=not args.no_demo)
        return serve(args, db_path, model)
    except HSCRError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace, db_path: Path, model: str) -> int:
    import gradio as gr

    from app.auth import PasswordCheck, anonymous_page_middleware, read_users
    from app.inspect_tab import warm_up
    from app.layout import CSS, build_app
    from app.state import AppContext, ModelCache
    from hscr.models.loader import resolve_device
    from hscr.store import ReadOnlyError, Store

    auth = None
    if args.auth:
        read_users(args.auth)  # fail at start, not at the first login
        auth = PasswordCheck(args.auth)
    if args.share:
        print(SHARE_WARNING, file=sys.stderr)
        logger.warning("public share link requested")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: other machines on the network can reach the app%s", args.host,
                       "" if auth else "; consider --auth")

    try:
        store = Store(db_path)
    except ReadOnlyError as exc:
        # Reviews and imports then fail with a clear message; browsing and inspecting keep working.
        print(f"warning: {exc}; serving the data read-only", file=sys.stderr)
        logger.warning("%s; serving the data read-only", exc)
        store = Store(db_path, read_only=True)
    context = AppContext(
        store=store,
        model=model,
        upload_limit_mb=args.max_upload_mb,
        auth_enabled=auth is not None,
        models=ModelCache(device=str(resolve_device(args.device))),
    )
    demo = build_app(context)
    threading.Thread(target=warm_up, args=(context,), name="model-warm-up", daemon=True).start()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    logger.info("serving %s with model %s on http://%s:%d", db_path, model, args.host, args.port)
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host,
            server_port=args.port,
            share=bool(args.share),
            auth=auth,
            auth_message="HSCR Studio: log in with your reviewer account.",
            max_file_size=f"{args.max_upload_mb}mb",
            allowed_paths=[],
            footer_links=[],
            run_history=False,
            ssr_mode=False,
            show_error=True,
            theme=theme,
            css=CSS,
            app_kwargs={"middleware": [anonymous_page_middleware()]} if auth else None,
        )
    finally:
        store.close()
    return 0
