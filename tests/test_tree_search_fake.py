"""A scripted arithmetic "policy" for fast, exact Stage-1 tests, and tests of the script itself.

It knows each prompt's problem and writes the gold next line with probability `p_right` (else the same line
with the result off by one, so every later step and the answer go wrong too). Continuations follow the stop
strings like a real backend: with "\n" it returns one line; the "Answer:" line ends with EOS. Every call is
recorded, so tests can count backend calls per round (cross-tree batching). At temperature 0 the line depends
on the prompt and prefix only, like a greedy decode.
"""
from __future__ import annotations

import random

from pipeline.backends.base import Completion, LogprobResult, SamplingParams, cut_at_stop
from pipeline.tasks.arith import Problem, TaskConfig, apply_op, make_split, problems_to_table
from pipeline.tasks.verify import parse_step, step_lines


class FakeArithBackend:
    model_id = "fake-arith"
    weights_hash = "0" * 64

    def __init__(self, problems: list[Problem], p_right: float = 0.7):
        self.by_prompt = {p.question: p for p in problems}
        self.p_right = p_right
        self.calls: list[dict] = []

    def _next_line(self, problem: Problem, done: list[str], rng: random.Random) -> str:
        k = len(done)
        last = parse_step(done[-1]) if done else None
        cur = last.c if last else problem.start
        if k >= problem.n_steps:
            right = rng.random() < self.p_right
            return f"Answer: {cur if right else cur + 1}"
        op, b = problem.ops[k]
        c = apply_op(cur, op, b)
        if rng.random() >= self.p_right:
            c += 1
        return f"Step {k + 1}: {cur} {op} {b} = {c}"

    def _sample(self, problem: Problem, prefix: str, sp: SamplingParams, rng: random.Random) -> Completion:
        done = step_lines(prefix)
        if any(ln.startswith("Answer") for ln in prefix.splitlines()):
            return Completion(text="", n_tokens=1, finish_reason="eos")
        text = ""
        while True:
            line = self._next_line(problem, done, rng)
            done.append(line)
            if line.startswith("Answer"):
                text += line
                return Completion(text=text, n_tokens=len(text) + 1, finish_reason="eos")
            text += line + "\n"
            cut, hit = cut_at_stop(text, sp.stop, sp.include_stop)
            if hit:
                return Completion(text=cut, n_tokens=len(cut) + 1, finish_reason="stop")

    def continue_(self, prompts, assistant_prefixes, sampling=None, n=None):
        sp = sampling or SamplingParams()
        n = n or sp.n
        self.calls.append({"kind": "continue", "prompts": len(prompts), "n": n, "seed": sp.seed})
        out = []
        for i, (prompt, prefix) in enumerate(zip(prompts, assistant_prefixes)):
            # greedy (temperature 0): the same line for a given prefix whatever the seed or position, right or
            # wrong by the same p_right draw (a policy whose argmax is wrong on some prefixes)
            rng = random.Random(f"greedy|{prompt}|{prefix}" if sp.greedy else f"{sp.seed}|{i}|{prompt}|{prefix}")
            out.append([self._sample(self.by_prompt[prompt], prefix, sp, rng) for _ in range(n)])
        return out

    def generate(self, prompts, sampling=None, n=None):
        return self.continue_(prompts, [""] * len(prompts), sampling, n)

    def logprobs(self, prompts, completions):
        self.calls.append({"kind": "logprobs", "prompts": len(prompts)})
        return [LogprobResult(total=-0.1 * len(c), per_token=[-0.1] * len(c), token_ids=[]) for c in completions]

    def close(self) -> None:
        pass


def task_rows(n: int, seed: int = 0):
    problems = make_split(TaskConfig.tiny(seed=seed, operand_max=9), "train", n)  # the golden difficulty
    return problems, problems_to_table(problems)


def test_fake_backend_follows_stop_strings_and_gold_path():
    problems, _ = task_rows(3)
    fb = FakeArithBackend(problems, p_right=1.0)
    p = problems[0]
    one = fb.continue_([p.question], [""], SamplingParams(stop=["\n"], seed=1), n=2)[0]
    assert [c.text for c in one] == [p.gold_steps[0]] * 2 and one[0].finish_reason == "stop"
    full = fb.continue_([p.question], [""], SamplingParams(seed=1), n=1)[0][0]
    assert full.text == p.gold_solution and full.finish_reason == "eos"
    prefix = "\n".join(p.gold_steps) + "\n"
    last = fb.continue_([p.question], [prefix], SamplingParams(stop=["\n"], seed=1), n=1)[0][0]
    assert last.text == f"Answer: {p.answer}" and last.finish_reason == "eos"
