"""The embedded demo: synthetic phantom Med-VQA data and a tiny demo model built offline.

    python -m hscr demo              # builds data/demo/model and imports datasets demo, demo-dicom
"""

from __future__ import annotations

from typing import Any


def ensure_demo(data_dir: Any = "data", progress: Any = True, **options: Any) -> dict[str, Any]:
    """Build the demo model and datasets where missing; see :func:`hscr.demo.build.ensure_demo`."""
    # Imported here so that `import hscr.demo` stays cheap (the builder imports torch).
    from hscr.demo.build import ensure_demo as build

    return build(data_dir, progress=progress, **options)


__all__ = ["ensure_demo"]
