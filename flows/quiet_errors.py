"""Under Prefect, an input error reads like one outside it: the `error:` line, with no traceback before it.

Prefect logs a failing task or flow with its traceback (exc_info), so a bad prompts file printed two
tracebacks before prefpipe's own `error: FILE, row R, column C: ...` line. A PrefpipeError is a message for the
user, not a bug: this filter drops the traceback from those records (the message stays, and so does the
traceback of every other exception, which is a bug report).
"""
from __future__ import annotations

import logging

from pipeline.errors import PrefpipeError


class DropUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PrefpipeError):
            record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Attach the filter to every handler Prefect's logging setup created (call after importing prefect)."""
    import prefect.main  # noqa: F401  (runs Prefect's logging setup, so its handlers exist)

    loggers = [logging.getLogger()] + [lg for name, lg in logging.Logger.manager.loggerDict.items()
                                       if name.startswith("prefect") and isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, DropUserErrorTracebacks) for f in handler.filters):
                handler.addFilter(DropUserErrorTracebacks())
