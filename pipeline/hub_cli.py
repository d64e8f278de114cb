"""`prefpipe export RUN_DIR --out FOLDER [--repo USER/NAME]`: build the Hub export folder and optionally push it."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def _rerun_hint(run_dir: Path, out: Path, repo: str, private: bool, token_env: str) -> str:
    """The command to run again after a failed push: the user's own command line when we have it (the export
    is deterministic, so rebuilding gives the same files and the Hub skips what it already holds)."""
    # The rerun finds this export at --out, so it needs --overwrite.
    if Path(sys.argv[0]).name == "prefpipe":
        return shlex.join(["prefpipe", *sys.argv[1:], *([] if "--overwrite" in sys.argv else ["--overwrite"])])
    parts = ["prefpipe", "export", str(run_dir), "--out", str(out), "--repo", repo, "--overwrite"]
    if private:
        parts.append("--private")
    if token_env != "HF_TOKEN":
        parts += ["--token-env", token_env]
    return shlex.join(parts)


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory (one folder per stage)."),
        out: Path = typer.Option(..., "--out", "-o", help="Export folder (created; a non-empty one needs "
                                                          "--overwrite)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export at --out: only the "
                                                                  "files its listing names are removed."),
        format: str = typer.Option("auto", "--format", help="conversational | standard | auto (conversational "
                                                            "when the generator has a chat template)."),
        tokenizer: Optional[str] = typer.Option(None, help="Model whose chat template renders prompts (default: "
                                                           "the generator the stages recorded)."),
        sft: bool = typer.Option(True, "--sft/--no-sft", help="Also export the SFT configs."),
        repo: Optional[str] = typer.Option(None, help="Also push to this Hub dataset repo (USER/NAME)."),
        private: bool = typer.Option(False, "--private", help="Create the Hub repo as private."),
        token_env: str = typer.Option("HF_TOKEN", help="Environment variable holding the Hub token (else the "
                                                       "`hf auth login` token is used)."),
        test_fraction: float = typer.Option(0.0, help="Share of prompts in a seeded `test` split."),
        seed: int = typer.Option(0, help="Seed of the train/test split."),
        rows_per_file: int = typer.Option(100_000, help="Most rows per parquet file."),
        stage: Optional[list[str]] = typer.Option(None, "--stage", help="Only this stage (repeatable)."),
        default_config: Optional[str] = typer.Option(None, help="Config loaded when no name is given."),
        license: str = typer.Option("apache-2.0", help="License id for the card."),
        pretty_name: Optional[str] = typer.Option(None, help="Card title."),
        limitation: Optional[list[str]] = typer.Option(None, "--limitation", help="Extra line for the card's "
                                                                                  "Limitations (repeatable)."),
        allow_incomplete: bool = typer.Option(False, help="Export stages that have not finished."),
        endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or the Hub)."),
    ) -> None:
        """Write data/<config>/<split>-*.parquet and a dataset card; with --repo, upload them to the Hub."""
        from pipeline.hub import ExportConfig, export_run, push_export

        from pydantic import ValidationError

        from pipeline.errors import InputError

        try:
            cfg = ExportConfig(format=format, tokenizer=tokenizer, overwrite=overwrite, sft=sft,
                               test_fraction=test_fraction, seed=seed, rows_per_file=rows_per_file,
                               stages=stage or None, default_config=default_config, license=license,
                               pretty_name=pretty_name, extra_limitations=limitation or [],
                               allow_incomplete=allow_incomplete)
        except ValidationError as e:
            err = e.errors()[0]
            option = "--" + str(err["loc"][0]).replace("_", "-")
            raise InputError(f"{option}: {err['msg']} (got {err.get('input')!r})") from None
        result = export_run(run_dir, out, cfg, repo_id=repo)
        for c in result.configs:
            splits = ", ".join(f"{s} {n}" for s, n in c.splits.items())
            dropped = sum(v for k, v in c.status.items() if k != "ok")
            typer.echo(f"{c.name}: {splits} rows ({dropped} not ok, left out)")
        typer.echo(f"wrote {result.folder} (card: {result.card_path})")
        if repo:
            url = push_export(result.folder, repo, private=private, token_env=token_env, endpoint=endpoint,
                              rerun_hint=_rerun_hint(run_dir, out, repo, private, token_env))
            typer.echo(f"pushed to {repo}: {url}")
