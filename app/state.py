"""Process-wide app state shared by all sessions: the store, the data folder and loaded models.

Nothing here belongs to one user: per-session values live in ``gr.State`` and the user name
comes from the request (the login, or the operating-system user when the app runs without
``--auth``).
"""

from __future__ import annotations

import functools
import getpass
import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from hscr.errors import HSCRError
from hscr.store import Store

logger = logging.getLogger(__name__)


class ModelCache:
    """Load each model once per app process and keep it for the token view.

    Loading happens under a lock, so two sessions asking for the same model at the same time
    load it once.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        from hscr.models import load_vlm

        with self._lock:
            if name not in self._models:
                logger.info("loading model %s on %s for the app", name, self.device)
                self._models[name] = load_vlm(name, device=self.device)
            return self._models[name]

    def put(self, name: str, vlm: Any) -> None:
        with self._lock:
            self._models[name] = vlm


@dataclass
class AppContext:
    """Process-wide settings and resources that every handler receives."""

    store: Store
    model: str                         # model path or hub id used for inspection and jobs
    upload_limit_mb: int = 200
    auth_enabled: bool = False
    models: ModelCache = field(default_factory=ModelCache)
    default_user: str = field(default_factory=getpass.getuser)

    @property
    def data_dir(self) -> Path:
        return self.store.data_dir

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    def resolve_data_path(self, relative: str | Path) -> Path:
        """Return an absolute path inside the data folder; raises HSCRError for paths outside it."""
        root = self.data_dir.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise HSCRError(f"path {relative} is outside the data folder {root}")
        return path


def user_name(context: AppContext, request: gr.Request | None) -> str:
    """Return the logged-in user, or the app's operating-system user when login is off."""
    name = getattr(request, "username", None) if request is not None else None
    if context.auth_enabled and not name:
        raise gr.Error("You are not logged in; reload the page and log in again.")
    return name or context.default_user


def bind(handler: Callable[..., Any], context: AppContext) -> Callable[..., Any]:
    """Return ``handler`` with its first argument set to ``context``, for use as a Gradio event.

    Unlike ``functools.partial``, the result keeps the remaining signature and type hints,
    which Gradio reads to pass ``gr.Request``, ``gr.EventData`` and ``gr.Progress``.
    """
    signature = inspect.signature(handler)
    remaining = list(signature.parameters.values())[1:]

    @functools.wraps(handler)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return handler(context, *args, **kwargs)

    bound.__signature__ = signature.replace(parameters=remaining)  # type: ignore[attr-defined]
    return bound
