"""`prefpipe inspect` and `prefpipe fingerprint`: look into a run directory."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.store import RunStore

console = Console()


def inspect_run(run_dir: Path, stage: str | None = None, show_schema: bool = True) -> dict:
    store = RunStore(run_dir)
    names = [stage] if stage else store.require_run()
    report = {}
    for name in names:
        st = store.stage(name)
        m = st.manifest()
        for o in m["outputs"]:
            st.files(o)  # every shard still as written (size, sha256), also without --schema
        report[name] = {
            "complete": m["complete"],
            "shards": len(m["shards"]),
            "input_rows": m["n_input_rows"],
            "outputs": {o: {"kind": k, "rows": st.num_rows(o),
                            "status": (m.get("summary") or {}).get("status", {}).get(o)
                            or _status_from_shards(m, o),
                            "schema": str(st.read(o).schema) if show_schema else None}
                        for o, k in m["outputs"].items()},
        }
    return report


def _status_from_shards(manifest: dict, output: str) -> dict:
    counts: dict[str, int] = {}
    for s in manifest["shards"].values():
        for k, v in s.get("status", {}).get(output, {}).items():
            counts[k] = counts.get(k, 0) + v
    return counts


def register(app: typer.Typer, stage_app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(run_dir: Path = typer.Argument(..., help="Run directory (holds one folder per stage)."),
                    stage: str = typer.Option(None, help="Only this stage."),
                    schema: bool = typer.Option(True, help="Print each output's Arrow schema."),
                    as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
        """Rows, status counts and schema of every stage in a run directory."""
        report = inspect_run(run_dir, stage, schema)
        if as_json:
            typer.echo(json.dumps(report, indent=1))
            return
        for name, info in report.items():
            t = Table(title=f"{name}  ({'complete' if info['complete'] else 'INCOMPLETE'}, "
                            f"{info['shards']} shards, {info['input_rows']} input rows)")
            for col in ("output", "kind", "rows", "status"):
                t.add_column(col)
            for o, d in info["outputs"].items():
                t.add_row(o, d["kind"], str(d["rows"]), ", ".join(f"{k}={v}" for k, v in d["status"].items()))
            console.print(t)
            if schema:
                for o, d in info["outputs"].items():
                    console.print(f"[bold]{name}/{o} schema[/bold]\n{d['schema']}")

    @app.command("validate")
    def validate_cmd(path: Path = typer.Argument(..., help="A table file (Parquet/JSONL) or a stage folder."),
                     kind: str = typer.Option("prompts", help="prompts | generations | trees | pairs | lists")):
        """Check a table against its schema and invariants; errors name the file, row and column."""
        from pipeline.engine import read_input
        from schemas import SCHEMAS, validate
        from schemas.errors import InputError

        if kind not in SCHEMAS:
            raise InputError(f"unknown table kind {kind!r}; expected one of {sorted(SCHEMAS)}", column="--kind")
        table = validate(read_input(path, kind), kind, file=str(path))
        typer.echo(f"ok: {table.num_rows} rows of {kind} in {path}")

    @app.command("fingerprint")
    def fingerprint_cmd(run_dir: Path = typer.Argument(..., help="Run directory."),
                        stage: str = typer.Argument(None, help="Stage name (all stages if omitted).")):
        """Print what went into a stage's fingerprint (stage, version, config, model, sampling, templates)."""
        store = RunStore(run_dir)
        for name in [stage] if stage else store.require_run():
            m = store.stage(name).manifest()
            typer.echo(json.dumps({"stage": name, "fingerprint": m["fingerprint"],
                                   "inputs": m["fingerprint_inputs"]}, indent=1, sort_keys=True))
