"""The `prefpipe` command. Each area adds its commands from its own module (see COMMAND_MODULES)."""
from __future__ import annotations

import importlib
import sys

import typer

from pipeline.errors import PrefpipeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="prefpipe: build preference data for LLM alignment and train on it.")
stage_app = typer.Typer(no_args_is_help=True, help="Run one pipeline stage (resumable through the run store).")
app.add_typer(stage_app, name="stage")

# Modules that define `register(app: typer.Typer, stage_app: typer.Typer)`; each owns its commands.
COMMAND_MODULES = [
    "pipeline.store_cli",
    "pipeline.tasks.cli",
    "pipeline.backends.cli",
    "pipeline.train.cli",
    "pipeline.hub_cli",
    "stages.cli",
    "flows.cli",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that area is not built yet
                continue
            raise
        mod.register(app, stage_app)


_register_all()


def main() -> None:
    try:
        app(standalone_mode=False)
    except PrefpipeError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here with standalone_mode=False
        import click
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
