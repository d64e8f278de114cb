"""Progress lines with a rate and an ETA for the long loops (training steps, eval batches).

One line at most every `every_s` seconds plus a last one, e.g.

    train tree-rpo: 40/120 steps (33 %), 1.3 steps/s, ETA 1m02s, loss 0.412

Plain lines rather than a redrawn bar: inside a flow several processes print side by side and their output
goes through log handlers, where a bar that rewrites itself turns into noise or prints nothing at all.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class ProgressLine:
    """`update(n, **fields)` after each unit of work; prints when `every_s` passed since the last line."""

    def __init__(self, label: str, total: int, unit: str, *, every_s: float = 10.0, stream: TextIO | None = None,
                 clock=time.monotonic):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream, self.clock = stream, clock
        self.done = self.skipped = 0
        self.start = self._last = clock()

    def skip(self, n: int) -> None:
        """Work found done already (a resumed stage's finished shards): counted, but not in the rate."""
        self.done += n
        self.skipped += n

    def line(self, fields: dict) -> str:
        elapsed = self.clock() - self.start
        rate = (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f} %)"]
        if self.done >= self.total:
            parts.append(f"done in {fmt_seconds(elapsed)}")
        elif rate > 0:
            parts += [f"{rate:.2f} {self.unit}/s", f"ETA {fmt_seconds((self.total - self.done) / rate)}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        return ", ".join(parts)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        now = self.clock()
        if self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            print(self.line(fields), file=self.stream or sys.stderr, flush=True)
