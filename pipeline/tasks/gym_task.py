"""`reasoning-gym:<name>`: any procedural dataset of the `reasoning-gym` package, seeded and sized, its
generator options passed through from the config; a response is checked by the dataset's own `score_answer`
(1.0 = right; the score itself is kept).

The answer read from a response: the last <answer>...</answer> (the package's own format, asked for by its
system prompt), else an "Answer: X" / "the answer is X" / "the answer to this problem is X" line, else the last
non-blank line. Option `system_prompt` (besides the generator's own): "default" (the package's), null (none: eval
then asks the bare question, as every stage does) or any text; a non-default one is stored in each row's options.
Each row's meta stores the dataset entry (question, answer, metadata) and the options, so a row is scored
later without regenerating its split. Splits: train and eval are drawn with different seeds derived from
(seed, split); the generators are procedural, so the two are different draws, not disjoint by construction.
"""
from __future__ import annotations

import hashlib
import re

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.tasks.base import Check, Task, meta_dict, problems_table

PREFIX = "reasoning-gym:"
# "the answer is X", "The final answer to the given problem is X" (a small model's usual sentence), "Answer: X"
_SAID = re.compile(r"(?:the\s+(?:final\s+)?answer(?:\s+(?:to|for|of)\b[^\n]{0,80}?)?\s+is|^\s*answer\s*:)"
                   r"\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def split_seed(seed: int, split: str) -> int:
    """A 31-bit seed per (seed, split), stable across processes."""
    return int(hashlib.sha1(f"prefpipe-gym|{seed}|{split}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _system_text(system_prompt: str | None) -> str | None:
    """"default": the package's prompt (think step by step, answer in <answer> tags); None or "none": no system
    turn, so `eval` asks the bare question exactly as the stages do (they send the prompt as one user turn)."""
    if system_prompt == "default":
        from reasoning_gym.utils import SYSTEM_PROMPTS

        return SYSTEM_PROMPTS["default"]
    return None if system_prompt in (None, "none", "") else system_prompt


class GymTask(Task):
    has_step_check = False
    generates = True

    def __init__(self, dataset: str, system_prompt: str | None = "default", **options):
        if dataset not in dataset_names():
            raise InputError(f"unknown reasoning-gym dataset {dataset!r}; one of: {', '.join(dataset_names())}",
                             column="task")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InputError(f"system_prompt must be text, 'default' or null, got {system_prompt!r}",
                             column="options.system_prompt")
        self.dataset, self._options = dataset, dict(options)  # the generator's own options
        self._system = system_prompt
        self.name = PREFIX + dataset
        self.system_prompt = _system_text(system_prompt)
        self._scorer = self._create(size=1, seed=0)  # score_answer depends on the options, never on the draw

    @property
    def options(self) -> dict:
        # the task's settings as rows store them: the generator's options, plus system_prompt where not default
        return self._options if self._system == "default" else {**self._options, "system_prompt": self._system}

    def _create(self, size: int, seed: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self._options)
        except (TypeError, ValueError, AssertionError) as e:  # a bad generator option
            raise InputError(f"reasoning-gym {self.dataset}: invalid options {self._options} ({e})",
                             column="task") from None

    def make(self, n: int, split: str = "train", seed: int = 0) -> pa.Table:
        if split not in ("train", "eval"):
            raise InputError(f"split must be train or eval, got {split!r}", column="split")
        ds = self._create(size=n, seed=split_seed(seed, split))
        rows = []
        for i in range(n):
            e = ds[i]
            entry = {"question": e["question"], "answer": e["answer"], "metadata": e.get("metadata", {})}
            rows.append({"prompt_id": f"{self.dataset}-{split}-{seed}-{i}", "prompt": e["question"],
                         "gold_answer": None if e["answer"] is None else str(e["answer"]),
                         "meta": self.meta(entry=entry)})
        return problems_table(rows)

    def entry(self, row: dict) -> dict:
        entry = meta_dict(row.get("meta")).get("entry")
        if not isinstance(entry, dict):
            raise InputError(f"a {self.name} row needs the dataset entry in its meta (made by `prefpipe task "
                             f"make`; prompt_id {row.get('prompt_id')!r})", column="meta")
        return entry

    def validate_row(self, row: dict) -> None:
        self.entry(row)

    def extract_answer(self, response: str) -> str | None:
        from reasoning_gym.utils import extract_answer

        tagged = extract_answer(response)
        if tagged is not None:
            return tagged
        said = _SAID.findall(response)
        if said:
            return said[-1].strip().rstrip(".").strip().strip("\"'“”")  # 'The answer is: "tuop".' -> tuop
        lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
        return lines[-1] if lines else None

    def check(self, response: str, row: dict) -> Check:
        score = float(self._scorer.score_answer(self.extract_answer(response), self.entry(row)))
        return Check(score >= 1.0, score)

    def row_has_gold(self, row: dict) -> bool:
        return True  # the dataset's scorer judges from the stored entry, even where the entry has no one answer

    def shown_solution(self, row: dict) -> str:
        return f"<answer>{row.get('gold_answer')}</answer>"
