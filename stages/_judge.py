"""Deterministic parsers and a batched judge/classify helper that the stages share (docs/stages.md, `judge`).

Every parser returns a `Parsed` with a status: "ok" or a failure category ("empty", "refusal", "echo", ...),
and an error text that starts with that category ("echo: 0.82 of the 4-grams copy the input"). Stages put
that text into the row's `error` column, where `error_category` reads it back (the run report counts the
categories of judged stages, flows/judged.py), so parse failures are counted and reported, never hidden.

The parsers are lenient where a small model is sloppy (bullets, numbering, case, repeated lines) but honest:
a text that does not carry the asked-for content is a failure, not a guess.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.backends.base import cut_at_stop
from pipeline.judges.parse import is_refusal  # noqa: F401  (stages import it from here)


@dataclass(frozen=True)
class Parsed:
    """The outcome of parsing one model output."""

    status: str = "ok"            # "ok" or the failure category
    value: Any = None
    error: str | None = None      # "<category>: detail" when status != "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def fail(category: str, detail: str, value: Any = None) -> Parsed:
    return Parsed(category, value, f"{category}: {detail}")


# ------------------------------------------------------------------------------------------------ text
_WS = re.compile(r"[ \t]+")
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s and s.strip()]


def dedupe_repeats(text: str) -> tuple[str, int]:
    """Drop sentences (and lines) that repeat an earlier one word for word, the loop small models fall into.

    Returns the cleaned text and how many pieces were dropped. Line breaks between kept pieces are kept.
    """
    seen: set[tuple[str, ...]] = set()
    out_lines, dropped = [], 0
    for line in text.strip().split("\n"):
        kept = []
        for s in re.split(r"(?<=[.!?])\s+", line.strip()):
            key = tuple(words(s))
            if not key:
                if s.strip():
                    kept.append(s)
                continue
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            kept.append(s)
        if kept or not line.strip():
            out_lines.append(_WS.sub(" ", " ".join(kept)).strip())
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(out_lines)).strip()
    return cleaned, dropped


def ngram_copy_ratio(text: str, sources: Sequence[str], n: int = 4) -> float:
    """Share of the word n-grams of `text` that also occur in any source (0 when `text` has none)."""
    def grams(ws: list[str]) -> set[tuple[str, ...]]:
        return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}

    mine = grams(words(text))
    if not mine:
        return 0.0
    theirs: set[tuple[str, ...]] = set()
    for s in sources:
        theirs |= grams(words(s))
    return len(mine & theirs) / len(mine)


def jaccard(a: str, b: str) -> float:
    wa, wb = set(words(a)), set(words(b))
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


# ---------------------------------------------------------------------------------------------- stance
_POS = re.compile(r"\b(better|preferred|preferable|superior|best|correct|accurate|clear(?:er)?|concise|helpful|"
                  r"useful|relevant|detailed|complete|precise|appropriate|informative|good|great|excellent|safe|"
                  r"more \w+|answers the question|right)\b", re.IGNORECASE)
_NEG = re.compile(r"(\b(?:not|no|worse|wrong|incorrect|inaccurate|fails?|lacks?|less|irrelevant|unhelpful|"
                  r"misses|missing|off-topic|vague|confusing|harmful|unsafe|only|poor|bad)\b|n't\b)", re.IGNORECASE)
# The reason clause ("... because it is not confusing") describes the label's merits; the verdict is before it.
_REASON = re.compile(r"\b(?:because|since|as it|which|so that)\b|[,:;]", re.IGNORECASE)
_THAN = re.compile(r"\bthan\b", re.IGNORECASE)


def _label_re(labels: Sequence[str]) -> re.Pattern:
    alt = "|".join(re.escape(x) for x in labels)
    # "Response A", "answer B", "option A", or a bare capital label followed by "is"/"'s".
    return re.compile(rf"\b(?:response|answer|option|assistant)\s+({alt})\b|(?-i:\b({alt})(?=\s+(?:is|was)\b))",
                      re.IGNORECASE)


def stance_scores(text: str, labels: Sequence[str] = ("A", "B")) -> dict[str, int]:
    """Net support per label: +1 for each sentence that praises it, -1 for each that faults it.

    A sentence naming one label counts by its cue words (a negation turns praise into fault). A sentence
    naming two labels counts only in the comparative form "X is better/more ... than Y" (X +1, Y -1) or
    "X is worse/less ... than Y" (X -1, Y +1). Labels are matched as whole words next to "response",
    "answer", "option" or "assistant", or directly before "is".
    """
    lab = _label_re(labels)
    score = {x: 0 for x in labels}
    canon = {x.lower(): x for x in labels}
    for s in sentences(text):
        found = [(m.start(), canon[(m.group(1) or m.group(2)).lower()]) for m in lab.finditer(s)]
        names = list(dict.fromkeys(x for _, x in found))
        if len(names) == 1:
            cut = _REASON.search(s, found[0][0])
            head = s[:cut.start()] if cut else s
            if not (_POS.search(head) or _NEG.search(head)):
                head = s
            pos, neg = bool(_POS.search(head)), bool(_NEG.search(head))
            score[names[0]] += -1 if neg else (1 if pos else 0)
        elif len(names) == 2:
            than = _THAN.search(s)
            if not than:
                continue
            before = [x for at, x in found if at < than.start()]
            after = [x for at, x in found if at > than.start()]
            if not before or not after or before[0] == after[0]:
                continue
            head = s[:than.start()]
            sign = -1 if re.search(r"\b(worse|less)\b", head, re.IGNORECASE) else (1 if _POS.search(head) else 0)
            score[before[0]] += sign
            score[after[0]] -= sign
    return score


def argued_for(text: str, preferred: str, other: str) -> str:
    """Which response the text argues for: "preferred", "other", "tied" (both equally) or "none"."""
    sc = stance_scores(text, (preferred, other))
    if sc[preferred] == sc[other]:
        return "none" if sc[preferred] == 0 else "tied"
    return "preferred" if sc[preferred] > sc[other] else "other"


# --------------------------------------------------------------------------------------------- parsers
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(\d+\))\s*")


def parse_bullets(text: str, *, min_words: int = 2, allow_plain: bool = True) -> list[str]:
    """Items of a bulleted or numbered list, one per line; unmarked lines count when `allow_plain`.

    Empty items, items shorter than `min_words` words and verbatim repeats are dropped.
    """
    items: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for line in text.split("\n"):
        marked = bool(_BULLET.match(line))
        item = line
        while _BULLET.match(item):   # "- 1. text" (a forced "- " before the model's own numbering)
            item = _BULLET.sub("", item, count=1)
        item = item.strip()
        if not item or (not marked and not allow_plain):
            continue
        key = tuple(words(item))
        if len(key) < min_words or key in seen:
            continue
        seen.add(key)
        items.append(item)
    return items


def parse_text(text: str, *, min_words: int = 3, sources: Sequence[str] = (), max_copy: float = 0.8,
               n: int = 4) -> Parsed:
    """A free-text answer: cleaned of loops, non-empty, not a refusal, not mostly copied from `sources`."""
    cleaned, dropped = dedupe_repeats(text)
    if not cleaned:
        return fail("empty", "no text" + (" after removing repeats" if dropped else ""))
    if is_refusal(cleaned):
        return fail("refusal", f"the text refuses: {cleaned[:80]!r}", cleaned)
    if len(words(cleaned)) < min_words:
        return fail("too_short", f"{len(words(cleaned))} words, need {min_words}", cleaned)
    if sources:
        ratio = ngram_copy_ratio(cleaned, sources, n)
        if ratio > max_copy:
            return fail("echo", f"{ratio:.2f} of its {n}-grams copy the input (max {max_copy})", cleaned)
    return Parsed("ok", cleaned)


# ------------------------------------------------------------------------------------- model helpers
def generate_parsed(backend, prompts: list, parse: Callable[[int, str], Parsed],
                    sampling: Callable[[int], object], *, prefixes: list[str] | None = None,
                    max_attempts: int = 1) -> tuple[list[Parsed], list[int]]:
    """Generate once per prompt, parse, and regenerate only the failures, up to `max_attempts` in all.

    Each attempt is one batched call over the prompts still failing. `parse(i, text)` parses the output of
    prompt i; `sampling(attempt)` gives the SamplingParams of an attempt (e.g. greedy first, then sampled).
    `prefixes` (one per prompt) start the assistant turn, through `continue_`. Returns the last parse of every
    prompt and how many attempts it took.
    """
    results: list[Parsed] = [fail("not_run", "no attempt")] * len(prompts)
    attempts = [0] * len(prompts)
    todo = list(range(len(prompts)))
    for attempt in range(max_attempts):
        if not todo:
            break
        sp = sampling(attempt)
        batch = [prompts[i] for i in todo]
        outs = backend.continue_(batch, [prefixes[i] for i in todo], sp, n=1) if prefixes is not None \
            else backend.generate(batch, sp, n=1)
        for i, o in zip(todo, outs):
            attempts[i] = attempt + 1
            # Cut at the stop strings again: a no-op for backends that honour them, a guard for those that don't.
            results[i] = parse(i, cut_at_stop(o[0].text, list(getattr(sp, "stop", []) or []), False)[0])
        todo = [i for i in todo if not results[i].ok]
    return results, attempts


def calibrate(p: float, p_content_free: float) -> float:
    """Contextual calibration of a yes/no probability (Zhao et al. 2021, "Calibrate before use"): divide out
    the answer bias the model shows on a content-free input, so 0.5 means "as likely Yes as for no content".
    Small models often put most mass on one answer word whatever the question; this undoes that bias."""
    q = min(max(p_content_free, 1e-6), 1 - 1e-6)
    yes, no = p / q, (1 - p) / (1 - q)
    return yes / (yes + no)


# --------------------------------------------------------------------------------------------- report
def error_category(error: str | None) -> str | None:
    if not error:
        return None
    return error.split(":", 1)[0].strip()

