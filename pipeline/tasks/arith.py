"""The bundled verifiable task: procedurally generated multi-step arithmetic word problems.

A problem is a start number and a list of (op, operand) steps wrapped in a word-problem template. Its gold
solution always has the one fixed format the verifiers parse:

    Step 1: 23 + 5 = 28
    Step 2: 28 * 3 = 84
    Answer: 84

Splits are deterministic per seed. Train and eval never share a problem: a problem's split is decided by a hash
of its canonical content (start, ops), so no seed, size or template choice can put one problem in both.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from pipeline.tasks.templates import PEOPLE, TEMPLATES, render

OPS = ("+", "-", "*", "/")
Split = Literal["train", "eval"]


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b
    raise ValueError(f"unknown op {op!r}")


def format_step(k: int, a: int, op: str, b: int) -> str:
    return f"Step {k}: {a} {op} {b} = {apply_op(a, op, b)}"


class TaskConfig(BaseModel):
    """Difficulty knobs and split sizes. Every field has a default that gives a mixed 2-6 step task."""

    min_steps: int = Field(2, ge=1, description="fewest (op, operand) steps in a problem")
    max_steps: int = Field(6, ge=1, description="most steps in a problem")
    start_min: int = Field(10, ge=0, description="smallest start number")
    start_max: int = Field(99, ge=0, description="largest start number")
    start_digits: int | None = Field(None, ge=1, le=9, description="if set, overrides start_min/max to this many digits")
    operand_min: int = Field(2, ge=1, description="smallest operand of + and -")
    operand_max: int = Field(99, ge=1, description="largest operand of + and -")
    operand_digits: int | None = Field(None, ge=1, le=9, description="if set, overrides operand_min/max for + and -")
    mul_min: int = Field(2, ge=2, description="smallest operand of * and / (1 would be a no-op step)")
    mul_max: int = Field(9, ge=2, description="largest operand of * and /")
    max_value: int = Field(999, ge=1, description="no intermediate result may exceed this")
    ops: list[str] = Field(default_factory=lambda: ["+", "-", "*"], description="ops drawn from (subset of + - * /)")
    templates: list[str] = Field(default_factory=lambda: list(TEMPLATES), description="template names to use")
    instruction: str = Field("", description="text appended to every question (e.g. the answer format)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of the content space reserved for eval")
    seed: int = Field(0, description="seed of both splits")
    n_train: int = Field(20000, ge=0, description="default train split size")
    n_eval: int = Field(1000, ge=0, description="default eval split size")

    @field_validator("ops", "templates")
    @classmethod
    def _known_names(cls, v: list[str], info: ValidationInfo) -> list[str]:
        allowed = OPS if info.field_name == "ops" else tuple(TEMPLATES)
        if not v or any(x not in allowed for x in v):
            raise ValueError(f"{info.field_name} must be a non-empty subset of {allowed}, got {v}")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> "TaskConfig":
        if self.start_digits is not None:
            self.start_min, self.start_max = _digit_range(self.start_digits)
            self.start_digits = None  # resolved once, so re-validating a dump gives the same ranges
        if self.operand_digits is not None:
            lo, self.operand_max = _digit_range(self.operand_digits)
            self.operand_min = max(lo, 1)  # adding or subtracting 0 is a no-op step
            self.operand_digits = None
        for lo, hi, what in ((self.min_steps, self.max_steps, "steps"), (self.start_min, self.start_max, "start"),
                             (self.operand_min, self.operand_max, "operand"), (self.mul_min, self.mul_max, "mul")):
            if lo > hi:
                raise ValueError(f"{what}: min {lo} > max {hi}")
        if self.start_max > self.max_value:
            raise ValueError(f"start_max {self.start_max} > max_value {self.max_value}")
        return self

    @classmethod
    def tiny(cls, **overrides) -> "TaskConfig":
        """The difficulty of the committed tiny policy (data/tiny-policy): 3-4 steps of + - * on 10-99 with
        + and - operands 2-99, * operands 2-9, values <= 999, terse templates. It was trained on the same problems
        with 2-4 steps; its greedy accuracy here is in data/tiny-policy/TRAINING.md."""
        base = dict(min_steps=3, max_steps=4, start_min=10, start_max=99, operand_min=2, operand_max=99,
                    mul_min=2, mul_max=9, max_value=999, ops=["+", "-", "*"], templates=["compact", "think"])
        return cls(**{**base, **overrides})


def _digit_range(d: int) -> tuple[int, int]:
    return (0 if d == 1 else 10 ** (d - 1)), 10 ** d - 1


@dataclass
class Problem:
    id: str
    question: str
    start: int
    ops: list[tuple[str, int]]
    answer: int
    gold_steps: list[str]
    gold_solution: str
    template: str = ""
    meta_extra: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(self.ops)

    def gold_line(self, k: int) -> str:
        """The right k-th line of a solution (1-based): gold step k, or the answer line after the last step."""
        return self.gold_steps[k - 1] if k <= self.n_steps else f"Answer: {self.answer}"

    def results(self) -> list[int]:
        """The running value after each step."""
        out, cur = [], self.start
        for op, b in self.ops:
            cur = apply_op(cur, op, b)
            out.append(cur)
        return out

    def meta_json(self) -> str:
        return json.dumps({"task": "arith", "id": self.id, "template": self.template, "start": self.start,
                           "ops": [[op, b] for op, b in self.ops], "answer": self.answer,
                           "question": self.question, **self.meta_extra}, separators=(",", ":"))


def canonical_key(start: int, ops: list[tuple[str, int]]) -> str:
    """The content of a problem, independent of wording: the unit of dedup and of the train/eval split."""
    return f"{start}|" + "|".join(f"{op}{b}" for op, b in ops)


def split_of(start: int, ops: list[tuple[str, int]], eval_fraction: float) -> Split:
    h = int(hashlib.sha1(canonical_key(start, ops).encode()).hexdigest()[:12], 16)
    return "eval" if h / float(16 ** 12) < eval_fraction else "train"


def gold_steps_for(start: int, ops: list[tuple[str, int]]) -> list[str]:
    steps, cur = [], start
    for k, (op, b) in enumerate(ops, 1):
        steps.append(format_step(k, cur, op, b))
        cur = apply_op(cur, op, b)
    return steps


def build_problem(start: int, ops: list[tuple[str, int]], question: str, template: str = "",
                  pid: str | None = None) -> Problem:
    """A Problem from its content; the gold solution is derived, never stored separately."""
    steps = gold_steps_for(start, ops)
    answer = start
    for op, b in ops:
        answer = apply_op(answer, op, b)
    pid = pid or "arith-" + hashlib.sha1(canonical_key(start, ops).encode()).hexdigest()[:16]
    return Problem(id=pid, question=question, start=start, ops=list(ops), answer=answer, gold_steps=steps,
                   gold_solution="\n".join(steps + [f"Answer: {answer}"]), template=template)


def _operands(cur: int, op: str, cfg: TaskConfig) -> range | list[int]:
    """Operands for `op` that keep the running value inside [0, max_value]."""
    if op == "+":
        return range(cfg.operand_min, min(cfg.operand_max, cfg.max_value - cur) + 1)
    if op == "-":
        return range(cfg.operand_min, min(cfg.operand_max, cur) + 1)
    if op == "*":
        return range(cfg.mul_min, min(cfg.mul_max, cfg.max_value // max(cur, 1)) + 1) if cur > 0 else range(0)
    return [b for b in range(cfg.mul_min, cfg.mul_max + 1) if cur > 0 and cur % b == 0]  # exact division only


def _draw_ops(rng: random.Random, cfg: TaskConfig, start: int, n_steps: int) -> list[tuple[str, int]] | None:
    ops, cur = [], start
    for _ in range(n_steps):
        choices = {op: _operands(cur, op, cfg) for op in cfg.ops}
        feasible = [op for op in cfg.ops if len(choices[op]) > 0]
        if not feasible:
            return None
        op = rng.choice(cfg.ops)
        if op not in feasible:  # e.g. '*' would overflow max_value: fall back to an op that fits
            op = rng.choice(feasible)
        b = rng.choice(choices[op])
        ops.append((op, b))
        cur = apply_op(cur, op, b)
    return ops


def make_problem(rng: random.Random, cfg: TaskConfig, idx: int) -> Problem:
    """One random problem. The template cycles with idx so every template appears in any split of size >= 6."""
    while True:
        start = rng.randint(cfg.start_min, cfg.start_max)
        ops = _draw_ops(rng, cfg, start, rng.randint(cfg.min_steps, cfg.max_steps))
        if ops is not None:
            break
    tpl = TEMPLATES[cfg.templates[idx % len(cfg.templates)]]
    person, item = rng.choice(PEOPLE), rng.choice(tpl.items)
    question = render(tpl, start, ops, person, item)
    if cfg.instruction:
        question = f"{question} {cfg.instruction}"
    return build_problem(start, ops, question, tpl.name)


def make_split(cfg: TaskConfig, split: Split, n: int | None = None) -> list[Problem]:
    """`n` distinct problems of one split (default cfg.n_train / cfg.n_eval). A smaller n gives a prefix of a
    larger one, so eval on the first 200 problems is eval on a subset of the first 1000."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    n = (cfg.n_train if split == "train" else cfg.n_eval) if n is None else n
    # A string seed is hashed with sha512 by `random`, so this is stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"prefpipe-arith|{cfg.seed}|{split}")
    seen: set[str] = set()
    out: list[Problem] = []
    draws, max_draws = 0, 200 * max(n, 1) + 10_000
    while len(out) < n:
        draws += 1
        if draws > max_draws:
            raise ValueError(f"could only find {len(out)} distinct {split} problems of {n}: the difficulty "
                             "settings leave too few distinct problems; widen the ranges or steps")
        p = make_problem(rng, cfg, len(out))
        key = canonical_key(p.start, p.ops)
        if key in seen or split_of(p.start, p.ops, cfg.eval_fraction) != split:
            continue
        seen.add(key)
        out.append(p)
    return out


TABLE_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("gold", pa.string()),
    ("gold_answer", pa.string()),
    ("gold_steps", pa.list_(pa.string())),
    ("answer", pa.int64()),
    ("n_steps", pa.int16()),
    ("meta", pa.string()),
])


def problems_to_table(problems: list[Problem]) -> pa.Table:
    """Prompts table of the bundled task: prompt_id, prompt, gold (full solution), gold_answer, gold_steps,
    answer, n_steps, meta (JSON from which `verify.problem_from_meta` rebuilds the Problem)."""
    return pa.table({
        "prompt_id": [p.id for p in problems],
        "prompt": [p.question for p in problems],
        "gold": [p.gold_solution for p in problems],
        "gold_answer": [str(p.answer) for p in problems],
        "gold_steps": [p.gold_steps for p in problems],
        "answer": [p.answer for p in problems],
        "n_steps": [p.n_steps for p in problems],
        "meta": [p.meta_json() for p in problems],
    }, schema=TABLE_SCHEMA)
