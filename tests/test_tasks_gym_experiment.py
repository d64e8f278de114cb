"""experiments/smollm2-gym/config.yaml: the eval asks the held-out problems exactly as the stages asked the
training problems (same generator options, the bare question as one user turn), so before/after accuracies
measure the prompts the pairs were built on."""
from __future__ import annotations

from pathlib import Path

from flows.config import load_run_config
from pipeline.tasks.registry import get_task, item_for_row

CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "smollm2-gym" / "config.yaml"


def test_eval_prompts_match_stage_prompts():
    cfg, _ = load_run_config(CONFIG)
    assert cfg.inputs.task_name == cfg.eval.task_name == "reasoning-gym:chain_sum"
    assert cfg.inputs.options == cfg.eval.options
    assert cfg.inputs.options["system_prompt"] is None
    task = get_task(cfg.eval.task_name, **cfg.eval.options)
    rows = task.make(3, "eval", seed=cfg.eval.seed).to_pylist()
    for row in rows:
        assert task.messages(row) == [{"role": "user", "content": row["prompt"]}]
        assert item_for_row(row).task is task  # the stored options rebuild the same (system-free) task
    assert {r["prompt"].count("+") + r["prompt"].count("-") for r in rows} == {1}  # two terms each
