"""`math`: word problems with one final answer (GSM8K, MATH and the like), checked with `math-verify`.

Files: JSONL, Parquet or a `datasets` folder. Column conventions read without a mapping: GSM8K's
(`question`, `answer` ending in `#### N`), MATH's (`problem`, `solution` with a `\\boxed{}` answer, `level` as the
difficulty) and prefpipe's own (`prompt`, `gold_answer`); anything else names its columns
(`prompt_column` / `answer_column`). A response's answer is its last `#### X`, else its last `\\boxed{X}`, else
"the answer is X" / "Answer: X", else its last number; it is right when math-verify finds it equal to the gold
(fractions, decimals, LaTeX, percents, sets and intervals as that library defines equality).
"""
from __future__ import annotations

import functools
import logging
import re
import threading

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.tasks.base import Check, Task, problems_table

# (prompt column, answer column) pairs tried in order when the caller names none.
CONVENTIONS = (("prompt", "gold_answer"), ("question", "answer"), ("problem", "solution"))
MAX_ANSWER_CHARS = 300  # off the main thread math-verify runs without its timeout: long inputs are cut
TIMEOUT_S = 5

_HASHES = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|^\s*answer\s*:)\s*:?\s*(.+?)\s*$",
                        re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?%?|-?\.\d+%?")

# math-verify logs a warning on every call made without its (signal-based, main-thread-only) timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched, so \\boxed{\\frac{1}{2}} works."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def _strip_sentence_end(s: str) -> str:
    s = s.strip().strip("$ ").rstrip(".").strip()
    return s.strip("$ ")


def extract_answer(text: str) -> str | None:
    """The final answer a response (or a gold solution) states, as text; None when it states none."""
    hashes = _HASHES.findall(text)
    if hashes:
        return _strip_sentence_end(hashes[-1])
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        inner = last_boxed(said[-1])
        return inner if inner is not None else _strip_sentence_end(said[-1])
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _timeout() -> int | None:
    """math-verify's timeout is a SIGALRM: usable in the main thread only (stages may run in worker threads)."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)  # the gold side repeats for every rollout of a problem
def _parse(answer: str) -> tuple:
    from math_verify import parse

    a = answer[:MAX_ANSWER_CHARS]
    # Bare LaTeX (\frac{1}{2}, intervals) is only read inside math delimiters; plain prose only outside them.
    return tuple(parse(f"${a}$", parsing_timeout=_timeout()) or parse(a, parsing_timeout=_timeout()))


def equivalent(answer: str | None, gold: str) -> bool:
    """math-verify's equality of a stated answer and the gold answer."""
    if answer is None:
        return False
    from math_verify import verify

    g, a = _parse(gold), _parse(answer)
    if not g or not a:  # nothing parsable on one side: fall back to the exact text
        return answer.strip() == gold.strip()
    return bool(verify(list(g), list(a), timeout_seconds=_timeout()))


class MathTask(Task):
    name = "math"
    generates = False

    def __init__(self, prompt_column: str | None = None, answer_column: str | None = None,
                 system_prompt: str | None = None):
        self.prompt_column, self.answer_column = prompt_column, answer_column
        self.system_prompt = system_prompt

    def load(self, path, limit: int | None = None, prompt_column: str | None = None,
             answer_column: str | None = None) -> pa.Table:
        from pipeline.tasks.loaders import load_prompts, read_columns

        pc, ac = prompt_column or self.prompt_column, answer_column or self.answer_column
        if pc is None or ac is None:
            cols = read_columns(path)
            found = next(((p, a) for p, a in CONVENTIONS if (pc or p) in cols and (ac or a) in cols), None)
            if found is None:
                raise InputError(f"no known question/answer columns in {sorted(cols)}: name them with "
                                 "--prompt-column and --answer-column", file=str(path))
            pc, ac = pc or found[0], ac or found[1]
        table = load_prompts(path, prompt_column=pc)
        if ac not in table.column_names:
            raise InputError(f"missing answer column (columns: {table.column_names})", file=str(path), column=ac)
        if limit:
            table = table.slice(0, limit)
        diff_col = next((c for c in ("difficulty", "level") if c in table.column_names), None)
        rows = []
        for i, r in enumerate(table.to_pylist(), 1):
            sol = r[ac]
            if sol is None or not str(sol).strip():
                raise InputError("empty answer", file=str(path), row=i, column=ac)
            gold = extract_answer(str(sol)) if ("####" in str(sol) or "\\boxed" in str(sol)) else str(sol).strip()
            if gold is None:
                raise InputError("no final answer found", file=str(path), row=i, column=ac)
            rows.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "gold_answer": gold,
                         "gold": str(sol), "meta": self.meta(gold_answer=gold),
                         "difficulty": None if diff_col is None or r[diff_col] is None else str(r[diff_col])})
        return problems_table(rows, {"gold": pa.string()})

    def extract_answer(self, response: str) -> str | None:
        return extract_answer(response)

    def check(self, response: str, row: dict) -> Check:
        gold = self.gold_answer(row)
        if gold is None:
            return super().check(response, row)
        ok = equivalent(extract_answer(response), str(gold))
        return Check(ok, float(ok))
