"""Swap the A/B labels a text uses for two responses ("Response A" <-> "Response B"), so the text still names
the same sides when the responses are shown in the other order. Only labels after response / answer /
option / assistant are swapped: a bare "A" is too often the article."""
from __future__ import annotations

import re

_LABEL = re.compile(r"\b(response|answer|option|assistant)(\s+)([AB])\b", re.IGNORECASE)


def swap_labels(text: str) -> str:
    return _LABEL.sub(lambda m: f"{m.group(1)}{m.group(2)}{'B' if m.group(3) in 'Aa' else 'A'}", text)
