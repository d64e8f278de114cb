"""`prompts`: open-ended prompts with no gold answer (chat, safety, writing). Stages that need gold refuse it
when the run config is loaded (a stage config's `gold_needed`, checked by flows/config.py)."""
from __future__ import annotations

import pyarrow as pa

from pipeline.tasks.base import Task, problems_table


class PromptsTask(Task):
    name = "prompts"
    has_gold = False

    def __init__(self, prompt_column: str | None = None, system_prompt: str | None = None):
        self.prompt_column, self.system_prompt = prompt_column, system_prompt

    def load(self, path, limit: int | None = None, prompt_column: str | None = None,
             answer_column: str | None = None) -> pa.Table:
        from pipeline.tasks.loaders import load_prompts

        table = load_prompts(path, prompt_column=prompt_column or self.prompt_column or "prompt")
        if limit:
            table = table.slice(0, limit)
        rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "meta": self.meta()}
                for r in table.select(["prompt_id", "prompt"]).to_pylist()]
        return problems_table(rows)

    def extract_answer(self, response: str) -> str | None:
        return None
