"""A verifier-backed judge: a judge model that answers from a task's own check (docs/judges.md), up to a declared
noise rate, served like any hosted judge. It needs no weights, so the embedded default (the tiny policy on the
bundled task) has a judge it can run offline whose accuracy is known.

It reads the judge primitive's default templates (pipeline/judges/templates.py) for the problems of one file:
- step:      Yes iff the steps so far plus the next step pass the task's step check (a task without one cannot
             say whether a mid-solution step is right: no answer);
- pointwise: the scale's top for a right response, its bottom for a wrong one (with a step check: the bottom
             plus the share of checks passed before the first wrong step, rounded);
- pairwise:  the right response of a right/wrong pair (right: every step and the answer, where steps are
             checked); one half each when both or neither is right.
A share `noise` of the questions, chosen by a hash of the question text (so the same question always gets the
same answer), is answered wrongly: the other answer, or the mirrored score. Anything else (a question about a
problem not in the file, another template) gets a reply that does not parse, which a stage counts as a row
error. Start it from the repository root:

    .venv/bin/python -m pipeline.judges.verifier_judge --problems PROBLEMS.parquet --port 8001 [--noise 0.1]

and name it in a stage's judge: `{model: verifier-judge, backend: http, base_url: http://127.0.0.1:8001/v1}`.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys

from pipeline.judges.scripted import ScriptedJudgeModel
from schemas.errors import PrefpipeError

STEP = re.compile(r"Problem: (.*)\n\nSteps so far:\n(.*)\n\nNext step: (.*)\n\nGiven the steps so far", re.S)
POINTWISE = re.compile(r"Question: (.*)\n\nResponse: (.*)\n\nGive one whole number from (-?\d+) to (-?\d+)\.",
                       re.S)
PAIRWISE = re.compile(r"Question: (.*)\n\nResponse A: (.*)\n\nResponse B: (.*)\n\nReply with only the letter",
                      re.S)
UNKNOWN = "I can only judge steps, scores and pairs of the problems I was given."


def errs(text: str, noise: float) -> bool:
    """Whether the judge answers this question wrongly: a fixed, hash-chosen `noise` share of questions."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 10_000 < 10_000 * noise


def truth_rule(items: dict, noise: float = 0.0):
    """The judge's rule over `items` (question text -> TaskItem, pipeline/tasks)."""
    def step(question: str, prefix: str, line: str):
        item = items.get(question)
        if item is None or not item.has_step_check:  # without a step check a mid-solution step is unknown
            return UNKNOWN
        steps = ([] if prefix == "(none)" else prefix.split("\n")) + [line]
        wrong = item.first_wrong_step("\n".join(steps))
        right = wrong is None or wrong > len(steps)
        return "Yes" if right != errs(question + prefix + line, noise) else "No"

    def pointwise(question: str, response: str, low: int, high: int):
        item = items.get(question)
        if item is None:
            return UNKNOWN
        share = float(item.correct(response))
        if item.has_step_check and item.n_steps:
            wrong = item.first_wrong_step(response)
            share = 1.0 if wrong is None else (wrong - 1) / (item.n_steps + 1)
        if errs(question + response, noise):
            share = 1.0 - share
        return str(low + round(share * (high - low)))

    def pairwise(question: str, a: str, b: str):
        item = items.get(question)
        if item is None:
            return UNKNOWN
        ra, rb = item.steps_ok(a), item.steps_ok(b)
        if ra == rb:
            return {"A": 0.5, "B": 0.5}
        return "A" if ra != errs(question + a + b, noise) else "B"

    def rule(q: str):
        if m := STEP.search(q):
            return step(*m.groups())
        if m := POINTWISE.search(q):
            return pointwise(m[1], m[2], int(m[3]), int(m[4]))
        if m := PAIRWISE.search(q):
            return pairwise(*m.groups())
        return UNKNOWN
    return rule


def verifier_judge(problems, noise: float = 0.0) -> ScriptedJudgeModel:
    """The judge model over a problems table (pyarrow; rows with prompt and meta / gold_answer)."""
    from pipeline.tasks.registry import item_for_row

    items = {r["prompt"]: item_for_row(r) for r in problems.to_pylist()}
    return ScriptedJudgeModel(truth_rule(items, noise), model_id="verifier-judge")


def main(argv: list[str] | None = None) -> None:
    from pipeline.backends.testserver import OpenAICompatServer
    from pipeline.engine import read_input

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", required=True, help="problems of a task with gold: a parquet or JSONL file, "
                                                       "or a stage folder")
    ap.add_argument("--noise", type=float, default=0.0, help="share of questions answered wrongly")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args(argv)
    if not 0.0 <= args.noise <= 1.0:  # `not` also catches nan
        ap.error(f"--noise must be in [0, 1], got {args.noise}")  # argparse: exit 2, one line
    try:  # bad problems are the user's input: one `error:` line and exit 2, not a traceback
        judge = verifier_judge(read_input(args.problems), args.noise)
    except PrefpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    srv = OpenAICompatServer(judge, "verifier-judge", args.host, args.port)
    print(f"serving verifier-judge (noise {args.noise}) at {srv.url}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
