"""`prefpipe task ...`: make a task's problems as Parquet files (the bundled task's splits by default, any
registered task with --task), and show a few bundled problems."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import pyarrow.parquet as pq
import typer
from pydantic import ValidationError

from pipeline.errors import InputError
from pipeline.tasks.arith import TaskConfig, make_split, problems_to_table


def _config(preset: str, seed: Optional[int], min_steps: Optional[int], max_steps: Optional[int],
            ops: Optional[str], start_digits: Optional[int], operand_digits: Optional[int]) -> TaskConfig:
    overrides = {k: v for k, v in dict(seed=seed, min_steps=min_steps, max_steps=max_steps,
                                       start_digits=start_digits, operand_digits=operand_digits).items()
                 if v is not None}
    if ops is not None:
        overrides["ops"] = [o.strip() for o in ops.split(",") if o.strip()]
    try:
        if preset == "tiny":
            return TaskConfig.tiny(**overrides)
        if preset == "default":
            return TaskConfig(**overrides)
    except ValidationError as e:
        raise InputError(f"invalid task settings: {e.errors()[0]['msg']}") from e
    raise InputError(f"unknown preset {preset!r}: expected 'tiny' or 'default'", column="--preset")


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _splits(split: str) -> list[str]:
    if split not in ("train", "eval", "both"):
        raise InputError(f"unknown split {split!r}: expected train, eval or both", column="--split")
    return ["train", "eval"] if split == "both" else [split]


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    task_app = typer.Typer(no_args_is_help=True, help="Tasks: problems with gold answers (arith, math, "
                                                      "reasoning-gym:<dataset>) or open prompts.")
    app.add_typer(task_app, name="task")

    @task_app.command("make")
    def make(out: Path = typer.Option(..., "--out", help="folder for train.parquet / eval.parquet"),
             split: str = typer.Option("both", help="train, eval or both"),
             n: Optional[int] = typer.Option(None, "--n", help="problems per split (default: the config's)"),
             seed: Optional[int] = typer.Option(None, help="split seed"),
             preset: str = typer.Option("tiny", help="tiny (the tiny policy's difficulty) or default (2-6 steps)"),
             min_steps: Optional[int] = typer.Option(None, "--min-steps"),
             max_steps: Optional[int] = typer.Option(None, "--max-steps"),
             ops: Optional[str] = typer.Option(None, help="comma-separated subset of + - * /"),
             start_digits: Optional[int] = typer.Option(None, "--start-digits"),
             operand_digits: Optional[int] = typer.Option(None, "--operand-digits"),
             task: str = typer.Option("arith", "--task", help="arith, math, prompts, reasoning-gym:<dataset>"),
             path: Optional[Path] = typer.Option(None, "--path", help="math / prompts: the file to read"),
             option: Optional[List[str]] = typer.Option(None, "--option", help="task setting key=value "
                                                        "(repeatable), e.g. min_terms=3"),
             prompt_column: Optional[str] = typer.Option(None, "--prompt-column"),
             answer_column: Optional[str] = typer.Option(None, "--answer-column")) -> None:
        """Write the task's splits as Parquet (plus task_config.json)."""
        if n is not None and n < 1:
            raise InputError("must be >= 1", column="--n")
        if task != "arith":
            _make_other(out, task, split, n, seed, path, option, prompt_column, answer_column)
            return
        cfg = _config(preset, seed, min_steps, max_steps, ops, start_digits, operand_digits)
        names = _splits(split)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            table = problems_to_table(make_split(cfg, name, n))
            _write_atomic(out / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
            typer.echo(f"wrote {out / f'{name}.parquet'}: {table.num_rows} problems")
        cfg_text = json.dumps(cfg.model_dump(), indent=2)
        _write_atomic(out / "task_config.json", lambda tmp: Path(tmp).write_text(cfg_text))

    def _make_other(out: Path, task: str, split: str, n: Optional[int], seed: Optional[int], path: Optional[Path],
                    option: Optional[List[str]], prompt_column: Optional[str], answer_column: Optional[str]) -> None:
        from pipeline.tasks.problems import load_problems, parse_options

        opts = parse_options(option)
        if path is not None:  # a file is one table: written as the requested split (train by default)
            names = ["train" if split == "both" else split]
        else:
            names = _splits(split)
        tables = {name: load_problems(task, path=path, n=None if path else (n or 1000), limit=n if path else None,
                                      split=name, seed=seed, prompt_column=prompt_column,
                                      answer_column=answer_column, options=opts)[1] for name in names}
        out.mkdir(parents=True, exist_ok=True)  # only after every split was made: nothing half-written
        for name, table in tables.items():
            _write_atomic(out / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
            typer.echo(f"wrote {out / f'{name}.parquet'}: {table.num_rows} problems")
        cfg_text = json.dumps({"task": task, "options": opts, "seed": seed, "path": str(path) if path else None},
                              indent=2)
        _write_atomic(out / "task_config.json", lambda tmp: Path(tmp).write_text(cfg_text))

    @task_app.command("show")
    def show(n: int = typer.Option(3, "--n", help="how many problems"),
             split: str = typer.Option("eval", help="train or eval"),
             seed: Optional[int] = typer.Option(None, help="split seed"),
             preset: str = typer.Option("tiny", help="tiny or default")) -> None:
        """Print a few problems with their gold solutions."""
        cfg = _config(preset, seed, None, None, None, None, None)
        if split not in ("train", "eval"):
            raise InputError(f"unknown split {split!r}: expected train or eval", column="--split")
        for p in make_split(cfg, split, n):
            typer.echo(f"[{p.id}] ({p.template}, {p.n_steps} steps)\n{p.question}\n{p.gold_solution}\n")
