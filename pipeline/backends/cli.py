"""`prefpipe eval`: greedy accuracy of a model on the bundled task, with a 95 % Wilson interval."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import InputError


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option("tiny-policy", help="tiny-policy, smollm2-135m or a local model folder "
                                                      "(for --backend http: the served model name)"),
        backend: str = typer.Option("transformers", help="transformers, vllm or http"),
        n: int = typer.Option(1000, min=1, help="number of eval problems (a prefix of the split)"),
        split: str = typer.Option("eval", help="eval or train"),
        batch_size: int = typer.Option(64, min=1, help="prompts per generate call"),
        max_tokens: int = typer.Option(256, min=1, help="most new tokens per answer"),
        base_url: Optional[str] = typer.Option(None, help="http backend: server root incl. /v1"),
        tokenizer: Optional[str] = typer.Option(None, help="http backend: local tokenizer (default: --model)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result (with per-problem "
                                                                      "outputs) to this JSON file"),
    ) -> None:
        """Greedy accuracy on the bundled arithmetic task (TaskConfig.tiny) with a 95 % Wilson interval."""
        from pipeline.backends import KINDS, make_backend
        from pipeline.evaluate import evaluate_task
        from pipeline.tasks.arith import TaskConfig, make_split

        if tokenizer is not None and backend != "http":
            raise InputError("--tokenizer only applies to --backend http", column="--tokenizer")
        if backend not in KINDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(KINDS)}", column="--backend")
        if split not in ("eval", "train"):
            raise InputError(f"unknown split {split!r}: expected eval or train", column="--split")
        problems = make_split(TaskConfig.tiny(), split, n)
        be = make_backend(backend, model, base_url=base_url, tokenizer=tokenizer)
        try:
            res = evaluate_task(be, problems, batch_size=batch_size, max_tokens=max_tokens)
        finally:
            be.close()
        res.update(model=model, backend=backend, split=split, weights_hash=be.weights_hash)
        typer.echo(f"accuracy {100 * res['accuracy']:.1f} % ({res['correct']}/{res['n']}), "
                   f"95 % CI [{100 * res['ci_low']:.1f}, {100 * res['ci_high']:.1f}] "
                   f"- model {model}, backend {backend}, split {split}")
        if json_out is not None:
            tmp = json_out.with_name(f".{json_out.name}.tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, json_out)
