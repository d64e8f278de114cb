"""The judge primitive (docs/judges.md): one object over any Backend that every stage calls.

    judge = Judge(backend)                       # mode auto: logprobs when the backend scores text, else votes
    judge.score([(question, response)], rubric="helpfulness", scale=(1, 10))   -> [Verdict] (value on the scale)
    judge.pairwise([(question, a, b)])          -> [PairVerdict] (both orders; bias measured and removed)
    judge.step([(question, steps_so_far, step)]) -> [Verdict] (value = P(step correct), PRISM)
    judge.yes_no([question])                     -> [Verdict] (value = P(Yes))

Every method makes one batched backend call for all its items (pairwise: both orders in the same call).
Every verdict records the judge model, the template version and the raw answer; an answer that does not parse
is a verdict with `error` holding the raw text, which stages put into the row's error column.

Position bias. A pair is shown as (A=a, B=b) and as (A=b, B=a). With p1 = P("A") in the first order and
p2 = P("A") in the second, P(a better) = (p1 + 1 - p2) / 2 and the bias toward the first slot is
(p1 + p2) / 2 - 1/2. If the judge adds a constant to P("A") whatever the content, the average cancels it
exactly. A verdict that flips with the order (both orders pick the same slot) is a tie.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.backends.base import SamplingParams
from pipeline.errors import InputError
from pipeline.judges.ask import Answer, ask_logprobs, ask_votes, supports_logprobs
from pipeline.judges.parse import parse_choice, parse_score, parse_yes_no
from pipeline.judges.relabel import swap_labels
from pipeline.judges.templates import JudgeTemplates

Mode = Literal["auto", "votes", "logprobs"]


@dataclass(frozen=True)
class Verdict:
    value: float | None            # P(Yes) / P(step correct) / the score on the declared scale
    raw: str                       # the answer text (votes: a JSON list of texts) or the option log-probs
    error: str | None
    model: str
    template: str                  # template version, e.g. "step-1a2b3c4d"
    unparsed: int = 0              # votes that did not parse (dropped)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PairVerdict:
    winner: Literal["a", "b", "tie"] | None
    p_a: float | None                          # P(a better), the two orders averaged
    p_first: tuple[float, float] | None        # P("A") with a shown first, and with b shown first
    raw: tuple[str, str]
    error: str | None
    model: str
    template: str

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def bias(self) -> float | None:
        """How much this judge favours the first slot on this pair (0: none)."""
        return None if self.p_first is None else (self.p_first[0] + self.p_first[1]) / 2 - 0.5


def position_bias(verdicts: Sequence[PairVerdict]) -> float | None:
    """Mean first-slot bias over the parsed pairs (None when none parsed)."""
    b = [v.bias for v in verdicts if v.ok]
    return sum(b) / len(b) if b else None


class Judge:
    def __init__(self, backend, *, mode: Mode = "auto", votes: int = 1, temperature: float | None = None,
                 max_tokens: int = 16, seed: int = 0, templates: JudgeTemplates | None = None):
        can_score = supports_logprobs(backend)
        if mode == "auto":
            mode = "logprobs" if can_score else "votes"
        if mode == "logprobs" and not can_score:
            raise InputError(f"judge mode 'logprobs' needs log-probs, and {backend.model_id!r} is "
                             "served chat-only (http without a local tokenizer): use mode 'votes'",
                             column="judge.mode")
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.backend, self.mode, self.votes = backend, mode, votes
        self.templates = templates or JudgeTemplates()
        # One greedy vote is the model's answer; several votes are only informative when sampled.
        temp = temperature if temperature is not None else (0.0 if votes == 1 else 1.0)
        self.sampling = SamplingParams(temperature=temp, max_tokens=max_tokens, seed=seed)
        self.model = getattr(backend, "model_id", None) or "unknown"

    # ---------------------------------------------------------------------------------------------- asking
    def _ask(self, prompts: list[str], options: Sequence[str], parse) -> list[Answer]:
        if self.mode == "logprobs":
            return ask_logprobs(self.backend, prompts, options)
        return ask_votes(self.backend, prompts, parse, self.sampling, self.votes)

    def _verdicts(self, answers: list[Answer], value, template: str) -> list[Verdict]:
        return [Verdict(None if a.error else value(a), a.raw, a.error, self.model, template, a.unparsed)
                for a in answers]

    def ask_yes_no(self, prompts: list[str], template: str) -> list[Verdict]:
        """P(Yes) for prompts already rendered by the caller (`template` names their template version)."""
        return self._verdicts(self._ask(prompts, ("Yes", "No"), parse_yes_no), lambda a: a.share("Yes"),
                              template)

    # ------------------------------------------------------------------------------------------ primitives
    def yes_no(self, questions: Sequence[str]) -> list[Verdict]:
        t = self.templates
        return self.ask_yes_no([t.yes_no.format(question=q) for q in questions], t.version("yes_no"))

    def step(self, items: Sequence[tuple[str, Sequence[str], str]]) -> list[Verdict]:
        """P(the next step is correct | the problem and the steps before it): PRISM's step judge."""
        t = self.templates
        prompts = [t.step.format(question=q, prefix="\n".join(prefix) if prefix else "(none)", step=s)
                   for q, prefix, s in items]
        return self.ask_yes_no(prompts, t.version("step"))

    def score(self, items: Sequence[tuple[str, str]], rubric: str,
              scale: tuple[int, int] = (1, 10)) -> list[Verdict]:
        """A score on the declared integer scale: the mean of the parsed votes, or the expected value under
        the scale's answer probabilities (logprobs)."""
        low, high = int(scale[0]), int(scale[1])
        if not low < high:
            raise ValueError(f"scale {scale}: low must be below high")
        t = self.templates
        prompts = [t.pointwise.format(rubric=rubric, question=q, response=r, low=low, high=high) for q, r in items]
        options = [str(k) for k in range(low, high + 1)]
        answers = self._ask(prompts, options, lambda text: parse_score(text, (low, high)))
        if self.mode == "logprobs":
            answers = [Answer([], {float(k): p for k, p in a.probs.items()}, a.raw) for a in answers]
        return self._verdicts(answers, Answer.mean, t.version("pointwise"))

    def pairwise(self, items: Sequence[tuple[str, str, str]]) -> list[PairVerdict]:
        """Which of (a, b) answers the question better, asked in both orders."""
        t = self.templates
        first = [t.pairwise.format(question=q, a=a, b=b) for q, a, b in items]
        second = [t.pairwise.format(question=q, a=b, b=a) for q, a, b in items]
        return self._both_orders(first, second, t.version("pairwise"))

    def argues_for(self, items: Sequence[tuple[str, str, str, str]]) -> list[PairVerdict]:
        """Which of (a, b) a text argues for. The text calls a "Response A" and b "Response B"; in the swapped
        order its labels are swapped with the responses, so it names the same sides."""
        t = self.templates
        first = [t.argues_for.format(question=q, a=a, b=b, text=x) for q, a, b, x in items]
        second = [t.argues_for.format(question=q, a=b, b=a, text=swap_labels(x)) for q, a, b, x in items]
        return self._both_orders(first, second, t.version("argues_for"))

    def _both_orders(self, first: list[str], second: list[str], template: str) -> list[PairVerdict]:
        n = len(first)
        answers = self._ask(first + second, ("A", "B"), parse_choice)  # both orders in one call
        out = []
        for one, two in zip(answers[:n], answers[n:]):
            raw = (one.raw, two.raw)
            if one.error or two.error:
                error = "; ".join(f"{name} order: {a.error}" for name, a in (("a-first", one), ("b-first", two))
                                  if a.error)
                out.append(PairVerdict(None, None, None, raw, error, self.model, template))
                continue
            p1, p2 = one.share("A"), two.share("A")
            if p1 > 0.5 and p2 < 0.5:
                winner = "a"
            elif p1 < 0.5 and p2 > 0.5:
                winner = "b"
            else:
                winner = "tie"  # the same slot wins in both orders (or no preference): position, not content
            out.append(PairVerdict(winner, (p1 + 1 - p2) / 2, (p1, p2), raw, None, self.model, template))
        return out
