"""Errors about the data a user pointed us at (a bad manifest, shards without samples, a
split without labels). Their messages name the input and the fix, so the CLI prints them
without a traceback; a plain ValueError from the same code is a bug and keeps its traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """The input data is not usable as given; the message names it and says what to do."""
