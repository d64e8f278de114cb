"""Verifiers for the bundled arithmetic task: final answer and step by step.

A solution is a sequence of lines "Step k: a OP b = c" followed by "Answer: N". Lines that are neither are
ignored (a model may add prose). `first_wrong_step` is what step-level pairing needs: the first index where the
solution leaves the gold path, or None when the whole solution is right.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pipeline.errors import InputError
from pipeline.tasks.arith import OPS, Problem, apply_op, build_problem

_STEP_HEAD = re.compile(r"^\s*Step\s+\d+\s*:", re.IGNORECASE)
_STEP = re.compile(r"^\s*Step\s+(\d+)\s*:\s*(-?\d+)\s*([-+*/x×])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$", re.IGNORECASE)
_ANSWER = re.compile(r"^\s*Answer\s*:\s*(-?\d+)\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedStep:
    k: int
    a: int
    op: str
    b: int
    c: int

    def arithmetic_ok(self) -> bool:
        if self.op == "/" and (self.b == 0 or self.a % self.b != 0):
            return False  # only exact division is a right step
        return apply_op(self.a, self.op, self.b) == self.c


def step_lines(text: str) -> list[str]:
    """The lines that start like a step ("Step k:"), in order, whether or not the rest parses."""
    return [ln.strip() for ln in text.splitlines() if _STEP_HEAD.match(ln)]


def parse_step(line: str) -> ParsedStep | None:
    m = _STEP.match(line)
    if not m:
        return None
    op = {"x": "*", "X": "*", "×": "*"}.get(m.group(3), m.group(3))
    return ParsedStep(int(m.group(1)), int(m.group(2)), op, int(m.group(4)), int(m.group(5)))


def extract_answer(text: str) -> int | None:
    """The number on the first "Answer: N" line; None when there is none."""
    for ln in text.splitlines():
        m = _ANSWER.match(ln)
        if m:
            return int(m.group(1))
    return None


def verify_answer(text: str, problem_or_answer: Problem | int) -> bool:
    gold = problem_or_answer.answer if isinstance(problem_or_answer, Problem) else int(problem_or_answer)
    return extract_answer(text) == gold


def first_wrong_step(text: str, problem: Problem) -> int | None:
    """1-based index of the first wrong step, or None when all steps and the final answer are right.

    Step k is right iff it parses, is labelled k, its left operand is the previous result (the start for k=1),
    its op and operand are the problem's k-th, and its arithmetic is right. A missing step is wrong at its index;
    a step beyond the problem's count is wrong at that index. When every step is right but the "Answer:" line is
    missing or differs from the last result, the answer line counts as step n_steps + 1.
    """
    lines = step_lines(text)
    prev = problem.start
    for k, (op, b) in enumerate(problem.ops, 1):
        if k > len(lines):
            return k
        s = parse_step(lines[k - 1])
        if s is None or s.k != k or s.a != prev or s.op != op or s.b != b or not s.arithmetic_ok():
            return k
        prev = s.c
    if len(lines) > len(problem.ops):
        return len(problem.ops) + 1
    if extract_answer(text) != prev:
        return len(problem.ops) + 1
    return None


def problem_from_meta(meta: str | dict) -> Problem:
    """Rebuild a Problem from the `meta` JSON column of a task table (see arith.problems_to_table)."""
    try:
        d = json.loads(meta) if isinstance(meta, str) else dict(meta)
        ops = [(str(op), int(b)) for op, b in d["ops"]]
        start = int(d["start"])
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"meta is not an arith problem record ({type(e).__name__}: {e})", column="meta") from e
    if any(op not in OPS for op, _ in ops):
        raise InputError(f"meta has an unknown op in {ops}", column="meta")
    return build_problem(start, ops, str(d.get("question", "")), str(d.get("template", "")), d.get("id"))


def problems_from_table(table) -> list[Problem]:
    """All Problems of a task table (reads only its `meta` column)."""
    if "meta" not in table.column_names:
        raise InputError("table has no 'meta' column; it was not made by `prefpipe task make`", column="meta")
    out = []
    for i, m in enumerate(table.column("meta").to_pylist(), 1):
        try:
            out.append(problem_from_meta(m))
        except InputError as e:
            raise InputError(e.reason, row=i, column="meta") from e
    return out
