"""`prefpipe run CONFIG` (the flow, or the same steps without Prefect) and `prefpipe serve CONFIG --cron`."""
from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(config: Path = typer.Argument(..., help="Run config YAML (see flows/configs/)."),
                prefect: bool = typer.Option(True, "--prefect/--no-prefect",
                                             help="Run as a Prefect flow (default) or call the steps directly.")):
        """Run a whole pipeline from a run config: stages, training arms, evals, report, export."""
        from flows.config import load_run_config

        load_run_config(config)  # fail on a bad config before starting anything
        if prefect:
            import os
            # A temporary local server starts when no PREFECT_API_URL is set; on a busy 2-core machine it can
            # need more than Prefect's default 20 s.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from flows.flow import prefpipe_flow
            out = prefpipe_flow(str(config.resolve()))
        else:
            from flows.flow import run_local
            out = run_local(str(config.resolve()))
        typer.echo(json.dumps(out, indent=1))

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
