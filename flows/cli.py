"""`prefpipe run CONFIG` (the flow, or the same steps without Prefect) and `prefpipe serve CONFIG --cron`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(config: Path = typer.Argument(..., help="Run config YAML (see flows/configs/)."),
                prefect: bool = typer.Option(True, "--prefect/--no-prefect",
                                             help="Run as a Prefect flow (default) or call the steps directly.")):
        """Run a whole pipeline from a run config: stages, training arms, evals, report, export."""
        from flows.config import load_run_config
        from flows.rerun import check_rerun

        cfg, base = load_run_config(config)  # fail on a bad config before starting anything
        check_rerun(cfg, base, str(config))  # ... or on a run folder it no longer matches (before Prefect starts)
        if prefect:
            import os
            # A temporary local server starts when no PREFECT_API_URL is set; on a busy 2-core machine it can
            # need more than Prefect's default 20 s.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from flows import quiet_errors
            from flows.flow import prefpipe_flow
            quiet_errors.install()  # an input error under Prefect: the error line, no traceback before it
            out = prefpipe_flow(str(config.resolve()))
        else:
            from flows.flow import run_local
            out = run_local(str(config.resolve()))
        typer.echo(json.dumps(out, indent=1))

    @app.command("spa", epilog="Example: prefpipe spa prompts.jsonl --policy runs/pi0/final --sft-model tiny-policy "
                               "--splits 3 --run-dir runs/spa")
    def spa_cmd(prompts: Path = typer.Argument(..., help="Prompts: JSONL, Parquet, a datasets folder or a stage "
                                                          "folder."),
                policy: str = typer.Option(..., help="pi_0, the first labelling policy (a DPO-trained model: with "
                                                     "pi_0 = the SFT model every reward ties)."),
                sft_model: str = typer.Option(..., "--sft-model", help="The SFT model the labels judge against."),
                run_dir: Path = typer.Option(..., "--run-dir", "-o", help="iter-<i>/ folders go here."),
                splits: int = typer.Option(2, min=1, help="Iterations: the prompts cut into this many disjoint, "
                                                          "contiguous splits."),
                beta: float = typer.Option(0.1, min=0.0, help="DPO beta of every iteration's training."),
                max_tokens: int = typer.Option(300, min=1, help="New tokens per sample when labelling."),
                max_steps: Optional[int] = typer.Option(None, min=1, help="Cap on each iteration's training "
                                                                          "steps (default: one epoch)."),
                backend: str = typer.Option("transformers", help="Backend of the labelling policy."),
                shard_size: int = typer.Option(64, min=1, help="Rows per labelling shard.")):
        """SPA: self-label a split with the current policy, train on it (it becomes the next policy), repeat."""
        from flows.spa import spa_iterate
        from pipeline.engine import read_input
        from schemas.errors import InputError
        from stages.self_label import SelfLabelConfig

        table = read_input(prompts)
        if table.num_rows < splits:
            raise InputError(f"{table.num_rows} prompts cannot make {splits} non-empty splits", file=str(prompts))
        cuts = [round(i * table.num_rows / splits) for i in range(splits + 1)]
        records = spa_iterate([table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])], policy=policy,
                              sft_model=sft_model, run_dir=run_dir, beta=beta, backend_kind=backend,
                              label=SelfLabelConfig(max_tokens=max_tokens), shard_size=shard_size,
                              train_overrides={"max_steps": max_steps} if max_steps else None)
        typer.echo(json.dumps([{"iteration": r["iteration"], "labels": r["labels"], "policy": r["policy_out"],
                                "agreement": r["report"]["agreement"]} for r in records], indent=1))

    @app.command("serve")
    def serve_cmd(config: Path = typer.Argument(..., help="Run config YAML."),
                  cron: str = typer.Option(None, help="Cron schedule, e.g. '0 3 * * *'."),
                  interval: int = typer.Option(None, help="Or run every N seconds."),
                  name: str = typer.Option(None, help="Deployment name (default: the config's name).")):
        """Serve the flow on a schedule against a Prefect server (PREFECT_API_URL must point at one)."""
        from flows.config import load_run_config
        from flows.flow import prefpipe_flow
        from schemas.errors import InputError

        cfg, _ = load_run_config(config)
        if (cron is None) == (interval is None):
            raise InputError("give exactly one of --cron or --interval")
        prefpipe_flow.serve(name=name or cfg.name, cron=cron, interval=interval,
                            parameters={"config_path": str(config.resolve())})
