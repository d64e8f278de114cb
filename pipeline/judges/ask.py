"""The two ways to get an answer distribution out of a model, on any Backend.

- votes: `n` sampled answers in one `generate` call per batch, each parsed; the distribution is the share of
  parsed votes per option. Works on chat-only servers (the http backend without a local tokenizer).
- logprobs: the teacher-forced probability of each option's tokens as the whole assistant answer, normalised
  over the options (one `logprobs` call for every prompt x option). Needs a backend that scores text.

Either way an `Answer` keeps the raw text the model gave (votes) or the option log-probs (logprobs), so every
verdict can be audited.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.backends.base import SamplingParams
from pipeline.judges.parse import is_refusal


@dataclass(frozen=True)
class Answer:
    """One prompt's answer: the parsed values (one per vote that parsed; for logprobs, a distribution), the
    raw text, and an error when nothing usable came back."""

    values: list[Any]                      # parsed votes (votes mode)
    probs: dict[Any, float] | None         # option -> probability (logprobs mode)
    raw: str
    error: str | None = None
    unparsed: int = 0                      # votes that did not parse

    def share(self, option: Any) -> float | None:
        """P(option): the normalised probability (logprobs) or the share of parsed votes naming it."""
        if self.error:
            return None
        if self.probs is not None:
            return self.probs.get(option, 0.0)
        return sum(v == option for v in self.values) / len(self.values)

    def mean(self) -> float | None:
        """The expected value of a numeric answer."""
        if self.error:
            return None
        if self.probs is not None:
            return sum(float(k) * p for k, p in self.probs.items())
        return sum(float(v) for v in self.values) / len(self.values)


def supports_logprobs(backend) -> bool:
    """Whether the backend can score text. The http backend can only with a local tokenizer (it finds the
    answer's tokens in the server's echo), so its `tokenizer` is None when it cannot; local backends always
    can, and so can any backend that declares no tokenizer at all (a `supports_logprobs` flag overrides)."""
    flag = getattr(backend, "supports_logprobs", None)
    if flag is not None:
        return bool(flag)
    return getattr(backend, "tokenizer", True) is not None


def ask_votes(backend, prompts: Sequence, parse: Callable[[str], Any], sampling: SamplingParams,
              n: int) -> list[Answer]:
    """`n` answers per prompt in one batched call; a vote that does not parse is dropped and counted. A
    prompt none of whose votes parse is an error holding the raw text ("refusal: ..." when it refuses)."""
    if not prompts:
        return []
    outs = backend.generate(list(prompts), sampling, n=n)
    answers = []
    for comps in outs:
        texts = [c.text for c in comps]
        parsed = [parse(t) for t in texts]
        values = [v for v in parsed if v is not None]
        raw = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
        error = None
        if not values:
            kind = "refusal" if all(is_refusal(t) for t in texts) else "unparseable"
            error = f"{kind}: the judge answered {raw[:500]!r}"
        answers.append(Answer(values, None, raw, error, len(texts) - len(values)))
    return answers


def ask_logprobs(backend, prompts: Sequence, options: Sequence[str], convert: Callable[[str], Any] = str
                 ) -> list[Answer]:
    """P(option | prompt) for each option as the full answer, normalised over `options`; one call."""
    if not prompts:
        return []
    k = len(options)
    res = backend.logprobs([p for p in prompts for _ in options], [o for _ in prompts for o in options])
    answers = []
    for i in range(len(prompts)):
        lps = [res[i * k + j].total for j in range(k)]
        top = max(lps)
        z = sum(math.exp(x - top) for x in lps)
        probs = {convert(o): math.exp(x - top) / z for o, x in zip(options, lps)}
        raw = json.dumps({o: round(x, 6) for o, x in zip(options, lps)})
        answers.append(Answer([], probs, raw))
    return answers
