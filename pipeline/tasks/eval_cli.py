"""`prefpipe eval`: greedy accuracy of a model on any task's problems, with a 95 % Wilson interval (per
difficulty where the task grades its problems)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import InputError


def _echo_result(res: dict, where: str) -> None:
    def line(r: dict) -> str:
        return (f"{100 * r['accuracy']:.1f} % ({r['correct']}/{r['n']}), "
                f"95 % CI [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]")

    typer.echo(f"accuracy {line(res)} - {where}")
    for d, r in res["by_difficulty"].items():
        typer.echo(f"  {d}: {line(r)}")


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        task: str = typer.Option("arith", help="task name: arith, math, reasoning-gym:<dataset>, or a registered "
                                               "one (`prompts` has no gold to check)"),
        model: str = typer.Option("tiny-policy", help="tiny-policy, smollm2-135m or a local model folder "
                                                      "(for --backend http: the served model name)"),
        backend: str = typer.Option("transformers", help="transformers, vllm or http"),
        path: Optional[Path] = typer.Option(None, "--path", help="problems file (JSONL, Parquet or a datasets "
                                                                 "folder); needed by math"),
        n: int = typer.Option(1000, min=1, help="generated tasks: problems to draw (file tasks: the first N)"),
        split: str = typer.Option("eval", help="generated tasks: eval or train"),
        seed: Optional[int] = typer.Option(None, help="generated tasks: split seed (default: the task's)"),
        option: Optional[List[str]] = typer.Option(None, "--option", help="task setting key=value (repeatable), "
                                                   "e.g. min_terms=3 for reasoning-gym:chain_sum"),
        prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="math: the question column"),
        answer_column: Optional[str] = typer.Option(None, "--answer-column", help="math: the answer column"),
        system: Optional[str] = typer.Option(None, help="system prompt (default: the task's, if any)"),
        few_shot: int = typer.Option(0, "--few-shot", min=0, help="first K train problems shown as examples"),
        batch_size: int = typer.Option(64, min=1, help="prompts per generate call"),
        max_tokens: int = typer.Option(256, min=1, help="most new tokens per answer"),
        base_url: Optional[str] = typer.Option(None, help="http backend: server root incl. /v1"),
        tokenizer: Optional[str] = typer.Option(None, help="http backend: local tokenizer (default: --model)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result (with per-problem "
                                                                      "outputs) to this JSON file"),
    ) -> None:
        """Greedy accuracy on a task (default: the bundled arithmetic task at the tiny policy's difficulty)."""
        from pipeline.backends import KINDS, make_backend
        from pipeline.evaluate import evaluate_task
        from pipeline.tasks.problems import load_problems, parse_options

        if tokenizer is not None and backend != "http":
            raise InputError("--tokenizer only applies to --backend http", column="--tokenizer")
        if backend not in KINDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(KINDS)}", column="--backend")
        if split not in ("eval", "train"):
            raise InputError(f"unknown split {split!r}: expected eval or train", column="--split")
        opts = parse_options(option)
        kw = dict(path=path, prompt_column=prompt_column, answer_column=answer_column, options=opts, seed=seed)
        t, table = load_problems(task, n=None if path else n, limit=n if path else None, split=split, **kw)
        if not t.has_gold:
            raise InputError(f"task {task!r} has no gold answers to evaluate against", column="--task")
        shots = ()
        if few_shot:  # examples from the other split (a file task: the rows after the evaluated ones)
            if path is None:
                shots = load_problems(task, n=few_shot, split="train" if split == "eval" else "eval",
                                      **kw)[1].to_pylist()
            else:
                shots = load_problems(task, limit=n + few_shot, **kw)[1].slice(n).to_pylist()
        be = make_backend(backend, model, base_url=base_url, tokenizer=tokenizer)  # after every input check
        try:
            res = evaluate_task(be, table.to_pylist(), batch_size=batch_size, max_tokens=max_tokens, task=t,
                                system=system, few_shot=shots)
        finally:
            be.close()
        res.update(task=t.name, model=model, backend=backend, split=split if path is None else str(path),
                   weights_hash=be.weights_hash)
        _echo_result(res, f"task {t.name}, model {model}, backend {backend}, "
                          f"{'split ' + split if path is None else 'file ' + str(path)}")
        if json_out is not None:
            tmp = json_out.with_name(f".{json_out.name}.tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, json_out)
