"""The one exception type of the data layer."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset or partition cannot be built from the given files or settings.

    The message names the file or setting at fault and how to fix it. It subclasses
    ``ValueError`` so callers that already catch bad-value errors keep working.
    """
