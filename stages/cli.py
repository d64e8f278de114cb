"""Registers `prefpipe stage NAME` for every registered stage (the package's and the user's plugin stages, see
stages/catalog.py), and the top-level `prefpipe generate` shortcut."""
from __future__ import annotations

import typer

from pipeline.stage import get_stage, list_stages
from pipeline.stage_cli import make_stage_command, register_stage_commands
from stages.catalog import load_stage_modules


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    load_stage_modules()
    register_stage_commands(stage_app, [get_stage(n) for n in list_stages()])
    app.command("generate", help="Prompts -> n samples each, into <run-dir>/generate/ (resumable).")(
        make_stage_command(get_stage("generate")))
