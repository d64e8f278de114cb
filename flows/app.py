"""The `prefpipe` command: one typer app, assembled here in the top layer from each area's command module.

Every module below defines `register(app, stage_app)` and owns its commands; they are imported plainly, so a
missing or broken module is an error at start-up, never a silently absent command. Global options (--version,
--threads) are handled by the app's callback before any command runs.
"""
from __future__ import annotations

import sys
from importlib.metadata import version as _dist_version
from typing import Optional

import typer

from flows import cli as flow_commands
from pipeline import hub_cli, store_cli
from pipeline.errors import PrefpipeError
from pipeline.tasks import cli as task_commands
from pipeline.tasks import eval_cli as eval_commands
from pipeline.threads import DEFAULT_THREADS, set_threads
from pipeline.train import cli as train_commands
from stages import cli as stage_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="prefpipe: build preference data for LLM alignment and train on it.")
stage_app = typer.Typer(no_args_is_help=True, help="Run one pipeline stage (resumable through the run store).")
app.add_typer(stage_app, name="stage")

COMMAND_MODULES = (store_cli, task_commands, eval_commands, train_commands, hub_cli, stage_commands,
                   flow_commands)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"prefpipe {_dist_version('prefpipe')}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the installed prefpipe version and exit."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1,
        help=f"CPU threads for torch and BLAS, here and in spawned workers (default: $OMP_NUM_THREADS if set, "
             f"else {DEFAULT_THREADS})."),
) -> None:
    set_threads(threads)


for _module in COMMAND_MODULES:
    _module.register(app, stage_app)

# An example line under every command's --help (a command may set its own `epilog`; tests/test_app.py checks that
# every command has one). Stage commands get theirs where they are registered (pipeline/stage_cli.py).
EXAMPLES = {
    "inspect": "prefpipe inspect runs/demo",
    "validate": "prefpipe validate runs/demo/tree --kind pairs",
    "fingerprint": "prefpipe fingerprint runs/demo tree",
    "eval": "prefpipe eval --task math --path problems.jsonl --model runs/demo/train/b/final --n 200",
    "train": "prefpipe train --model tiny-policy --data runs/demo/step-pairs --output-dir runs/train --beta 0.1",
    "export": "prefpipe export runs/demo --out runs/demo/export",
    "generate": "prefpipe generate -i prompts.jsonl -o runs/gen --n 4",
    "run": "prefpipe run flows/configs/demo.yaml",
    "serve": "prefpipe serve flows/configs/demo.yaml --cron '0 3 * * *'",
    "task make": "prefpipe task make --task reasoning-gym:chain_sum --out data/task --n 500",
    "task show": "prefpipe task show --n 3 --split eval",
}


def _add_examples(group: typer.Typer, prefix: str) -> None:
    for info in group.registered_commands:
        name = f"{prefix}{info.name or info.callback.__name__.replace('_', '-')}"
        if info.epilog is None and name in EXAMPLES:
            info.epilog = f"Example: {EXAMPLES[name]}"
    for sub in group.registered_groups:
        _add_examples(sub.typer_instance, f"{prefix}{sub.name} ")


_add_examples(app, "")


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
    except typer.TyperException as e:  # usage errors (typer's own click) arrive here with standalone_mode=False
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
