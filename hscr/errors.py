"""User-facing errors.

Library code raises :class:`HSCRError` for bad input that a person can fix (a missing file, an
unknown model id, an invalid field). Command-line entry points print its message on one line and
exit non-zero without a traceback; the app shows it with ``gr.Error``.
"""


class HSCRError(Exception):
    """Bad input or environment: the message names the value and what to do about it."""


class ModelLoadError(HSCRError):
    """A model or processor could not be loaded or is not usable for HSCR."""


class DataError(HSCRError):
    """A dataset file, image or field is missing or invalid."""
