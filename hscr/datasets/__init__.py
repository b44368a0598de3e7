"""Dataset importers.

Each format module has ``detect(path) -> str | None`` (the layout found, or None) and
``import_path(store, path, options) -> ImportReport``.
"""

FORMATS = {
    "vqa-rad": "hscr.datasets.vqa_rad",
    "slake": "hscr.datasets.slake",
    "pathvqa": "hscr.datasets.pathvqa",
    "llava-med": "hscr.datasets.llava_med",
    "folder": "hscr.datasets.folder",
}
