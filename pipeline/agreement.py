"""Does a preference label agree with a verifier? The one count behind the run report's verifier row, the
self-label stage's `label_report` and tree search's `quality_report`."""
from __future__ import annotations

from collections.abc import Iterable

KINDS = ("agree", "both_right", "both_wrong", "inverted")


def label_agreement(verdicts: Iterable[tuple[bool | None, bool | None]]) -> dict | None:
    """`verdicts`: (chosen is right, rejected is right) per pair. "agree": chosen right and rejected wrong;
    "inverted": the reverse; "both_right" / "both_wrong": the label carries no answer signal. A pair with an
    unknown side (None) is not counted. Returns the counts, n and agree_share, or None when nothing counted."""
    counts = dict.fromkeys(KINDS, 0)
    for c, r in verdicts:
        if c is None or r is None:
            continue
        counts["agree" if c and not r else "inverted" if r and not c else "both_right" if c else "both_wrong"] += 1
    n = sum(counts.values())
    return {**counts, "n": n, "agree_share": counts["agree"] / n} if n else None
