"""Parsers of a judge's structured answer. Each returns the parsed value or None (then the caller keeps the
raw text as the row's error). Lenient on case, brackets and trailing punctuation; never a guess: a text that
names both options, or none, is unparseable."""
from __future__ import annotations

import re

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i can(?:not|'t)\b|i am unable|i'?m unable|as an ai\b|as a language model|"
    r"i (?:will|won'?t) not (?:help|provide|answer)|i won'?t (?:help|provide|answer))", re.IGNORECASE)
_NUM = r"[-+]?\d+(?:\.\d+)?"
_SCORE = re.compile(rf"\b(?:score|rating)\s*[:=]?\s*\[*\s*({_NUM})", re.IGNORECASE)
_BARE_NUM = re.compile(rf"^\s*\[*\s*({_NUM})\s*\]*\s*(?:/\s*\d+)?\s*[.!]?\s*$")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def _tagged_or_bare(text: str, options: tuple[str, ...], tag: str) -> str | None:
    """The option named after "<tag>:" (the last such mention), else a text that is only the option."""
    alt = "|".join(re.escape(o) for o in options)
    tagged = re.findall(rf"\b(?:{tag})\s*[:=]\s*\[*\s*(?:response\s+)?({alt})\b", text, re.IGNORECASE)
    if tagged:
        return _canon(tagged[-1], options)
    bare = re.fullmatch(rf"\s*\[*\s*(?:response\s+)?({alt})\s*\]*\s*[.!]?\s*", text, re.IGNORECASE)
    if bare:
        return _canon(bare.group(1), options)
    # A one-line answer that starts with the option ("Yes, because ...", "A is better").
    head = re.match(rf"\s*\[*\s*(?:response\s+)?({alt})\b(?!\s*(?:and|or|/)\s*(?:{alt})\b)", text, re.IGNORECASE)
    return _canon(head.group(1), options) if head else None


def _canon(found: str, options: tuple[str, ...]) -> str:
    return next(o for o in options if o.lower() == found.lower())


def parse_choice(text: str, options: tuple[str, ...] = ("A", "B")) -> str | None:
    """Which option a pairwise answer names: "Answer: A", "[[B]]", "Response A", "A"."""
    return _tagged_or_bare(text, options, "answer|verdict|winner|better|preferred")


def parse_yes_no(text: str) -> str | None:
    """"Yes" or "No" from "Answer: yes", "No.", "Yes, the step is right"."""
    return _tagged_or_bare(text, ("Yes", "No"), "answer|verdict")


def parse_score(text: str, scale: tuple[float, float]) -> float | None:
    """The last "Score: N" (or a bare number) when it lies on the declared scale; None otherwise."""
    hits = _SCORE.findall(text)
    if not hits:
        bare = _BARE_NUM.match(text)
        hits = [bare.group(1)] if bare else []
    if not hits:
        return None
    v = float(hits[-1])
    return v if scale[0] <= v <= scale[1] else None
