"""One JSON Lines record, parsed so that every way it can be malformed is an InputError naming file and line.

Beyond what `json.loads` refuses, two things it accepts would fail later with a traceback: an escaped unpaired
surrogate ("\\ud800" decodes to a str that cannot be encoded as UTF-8, so Arrow and Parquet refuse it) and very
deep nesting (json.loads itself raises RecursionError past ~1,000 levels; Arrow cannot build nested columns
anywhere near that deep). Records are flat in every table kind, so MAX_DEPTH is generous.
"""
from __future__ import annotations

import json

from schemas.errors import InputError

MAX_DEPTH = 32


def parse_record(text: str, file: str, line: int) -> dict:
    """The JSON object on one line (1-based `line`), or an InputError naming file and line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} at char {e.pos}", file=file, row=line) from None
    except RecursionError:
        raise InputError(f"JSON nested deeper than {MAX_DEPTH} levels", file=file, row=line) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=file, row=line)
    # cheap gates: only an escape can make a surrogate, only many brackets can nest deeply
    if "\\u" in text or text.count("[") + text.count("{") > MAX_DEPTH:
        check_values(obj, file, line)
    return obj


def check_values(obj, file: str, line: int) -> None:
    stack = [(obj, 1, None)]
    while stack:  # iterative: a recursive walk could itself hit the recursion limit
        value, depth, key = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"JSON nested deeper than {MAX_DEPTH} levels", file=file, row=line, column=key)
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, file, line, key)
                stack.append((v, depth + 1, key or k))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, key) for v in value)
        elif isinstance(value, str):
            _check_text(value, file, line, key)


def _check_text(text: str, file: str, line: int, column: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"unpaired surrogate {text[e.start]!r} at char {e.start} of a string (not encodable "
                         f"as UTF-8)", file=file, row=line, column=column) from None
