"""Errors that name where bad input is: file, row and column."""
from __future__ import annotations


class PrefpipeError(Exception):
    """Base class for errors prefpipe reports to users (CLI exits non-zero with the message)."""


class InputError(PrefpipeError):
    """Bad user input. The message always says which file, row and column were wrong when known."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.file, self.row, self.column, self.reason = file, row, column, message
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__((", ".join(where) + ": " if where else "") + message)


class BackendError(PrefpipeError):
    """A model backend failed (retryable unless stated otherwise)."""
