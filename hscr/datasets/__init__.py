"""Dataset importers. Each format module has ``import_path(store, path, options) -> ImportReport``."""

FORMATS = {
    "folder": "hscr.datasets.folder",
}
