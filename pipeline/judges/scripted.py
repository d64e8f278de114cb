"""A scripted judge model: its answers follow a rule of the question, with a known position bias and noise,
behind the real tokenizer of the tiny policy. Serve it with pipeline.backends.testserver (an OpenAI-compatible
server on 127.0.0.1) and judge through the http backend, chat-only (votes) or with a tokenizer (log-probs),
to check what a judge does when its behaviour is known exactly.

`rule(question) -> {answer: probability}` or a fixed answer text (a malformed or refusing reply).
Votes are deterministic: of n answers, each option gets its largest-remainder share of n, in the rule's
order, so n votes give the rule's probabilities to within 1/n (exactly when n * p is whole). Log-probs are
log p(answer) for an answer the rule names, and log(1e-9) for any other text.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.backends.base import Completion, LogprobResult, SamplingParams
from pipeline.backends.tokenized import TokenizedBackend, load_tokenizer
from pipeline.models import tiny_policy_dir

Rule = Callable[[str], "dict[str, float] | str"]
_ASSISTANT = "<|assistant|>\n"   # the tiny policy's chat template: the user turn ends where this starts
_USER = "<|user|>\n"


def quota(dist: dict[str, float], n: int) -> list[str]:
    """n answers whose counts are the largest-remainder rounding of n * p."""
    exact = {a: n * p for a, p in dist.items()}
    counts = {a: math.floor(x) for a, x in exact.items()}
    left = n - sum(counts.values())
    for a in sorted(exact, key=lambda a: counts[a] - exact[a])[:left]:
        counts[a] += 1
    return [a for a in dist for _ in range(counts[a])]


class ScriptedJudgeModel(TokenizedBackend):
    context_length = None

    def __init__(self, rule: Rule, model_id: str = "scripted-judge"):
        self.rule, self.model_id = rule, model_id
        self.weights_hash = f"scripted:{model_id}"
        self.tokenizer = load_tokenizer(str(tiny_policy_dir()))
        self.calls = 0    # generate/score calls received (a batched stage makes few)

    def _split(self, ids: list[int]) -> tuple[str, str]:
        """(the user's question, the assistant text after it) of a templated sequence."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        head, _, answer = text.rpartition(_ASSISTANT)
        question = head.rpartition(_USER)[2].removesuffix("\n")
        return question, answer.replace(self.tokenizer.eos_token or "\0", "")

    def generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                     n: int) -> list[list[Completion]]:
        self.calls += 1
        out = []
        for ids in prompt_ids:
            got = self.rule(self._split(ids)[0])
            texts = [got] * n if isinstance(got, str) else quota(got, n)
            out.append([Completion(text=t, token_ids=[], n_tokens=1, finish_reason="stop") for t in texts])
        return out

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[LogprobResult]:
        """The answer's log-probability sits on its last token (the rest 0), so any span that ends with the
        answer, as the http backend's echo slice does, sums to it."""
        self.calls += 1
        out = []
        for p, c in zip(prompt_ids, completion_ids):
            question, answer = self._split(p + c)
            got = self.rule(question)
            prob = got.get(answer.strip(), 1e-9) if isinstance(got, dict) else 1e-9
            per = [0.0] * (len(c) - 1) + [math.log(max(prob, 1e-9))]
            out.append(LogprobResult(total=sum(per), per_token=per, token_ids=list(c)))
        return out
